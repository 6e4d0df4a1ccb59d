"""The Kueue step of the lifecycle, as a table of Workload states (pure: no API)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from test_lifecycle import T0, make_job, pod, pods_created, run

from kubetune_operator import kueue
from kubetune_operator.status import get_condition

pytestmark = pytest.mark.unit


def workload(*conds: tuple[str, bool, str, str], flavor: str | None = None) -> kueue.WorkloadView:
    raw = [
        {"type": t, "status": "True" if s else "False", "reason": r, "message": m, "lastTransitionTime": "x"}
        for t, s, r, m in conds
    ]
    body: dict = {"metadata": {"name": "finetunejob-demo-u-1", "resourceVersion": "7"}, "status": {}}
    body["status"]["conditions"] = raw
    if flavor:
        body["status"]["admission"] = {
            "clusterQueue": "cq",
            "podSetAssignments": [{"name": "trainer", "flavors": {"nvidia.com/gpu": flavor}}],
        }
    return kueue.workload_view(body)


ADMITTED = (("QuotaReserved", True, "QuotaReserved", "ok"), ("Admitted", True, "Admitted", "ok"))
PREEMPTED = (
    "Evicted",
    True,
    "Preempted",
    "Preempted to accommodate a workload (UID: x) due to prioritization",
)
GPU = kueue.Flavor(node_labels={"pool": "gpu"}, tolerations=({"key": "gpu", "operator": "Exists"},))


def queue(wl: kueue.WorkloadView | None, **kw) -> kueue.QueueView:
    return kueue.QueueView(local_queue="team-a", workload=wl, flavors={"gpu": GPU}, **kw)


def test_a_labelled_job_creates_its_workload_and_no_pod_until_admitted():
    job = make_job(workers=2)
    p = run(job, {}, [], queue=queue(None))
    assert pods_created(p) == [] and p.status["phase"] == "Queued"
    wl = p.workload_create
    assert wl is not None and wl["spec"]["queueName"] == "team-a"
    assert wl["spec"]["podSets"][0]["count"] == 2  # one gang
    assert wl["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert get_condition(p.status, "Queued")["status"] == "True"
    waiting = workload(("QuotaReserved", False, "Inadmissible", "LocalQueue team-a doesn't exist"))
    p2 = run(job, p.status, [], queue=queue(waiting))
    assert pods_created(p2) == [] and p2.workload_create is None
    assert "LocalQueue team-a doesn't exist" in p2.status["message"]
    assert get_condition(p2.status, "Queued")["reason"] == "Inadmissible"


def test_admission_starts_the_pods_on_the_admitted_flavor_and_reports_the_wait():
    job = make_job()
    p = run(job, {}, [], queue=queue(None))
    later = T0 + timedelta(seconds=42)
    p2 = run(job, p.status, [], now=later, queue=queue(workload(*ADMITTED, flavor="gpu")))
    assert pods_created(p2) == ["demo-a1-0"] and p2.status["phase"] == "Pending"
    spec = next(o for o in p2.create if o["kind"] == "Pod")["spec"]
    assert spec["nodeSelector"] == {"pool": "gpu"}
    assert {"key": "gpu", "operator": "Exists"} in spec["tolerations"]
    assert p2.queued_seconds == 42.0
    assert p2.status["kueue"]["admitted"] is True and p2.status["kueue"]["clusterQueue"] == "cq"


def test_a_kueue_preemption_stops_gracefully_counts_once_and_hands_the_quota_back():
    job = make_job(backoffLimit=0)
    admitted = queue(workload(*ADMITTED, flavor="gpu"))
    p1 = run(job, {}, [], queue=admitted)
    st = run(job, p1.status, [pod()], queue=admitted).status
    assert st["phase"] == "Running"
    evicted = queue(workload(*ADMITTED, PREEMPTED, flavor="gpu"))
    p = run(job, st, [pod()], queue=evicted)
    assert p.delete_pods == ("demo-a1-0",)  # graceful: SIGTERM, checkpoint, exit 143
    assert p.status["preemptionsByReason"] == {"KueuePreempted": 1}
    assert p.status["failures"] == 0 and p.status["lostSteps"] == 0
    assert p.status["phase"] == "Queued" and p.status["attempt"] == 2
    assert p.workload_patch is None  # the quota stays reserved until the pod has stopped
    assert pods_created(p) == []
    stopping = pod(phase="Running", deleting_since=T0)
    p2 = run(job, p.status, [stopping], queue=evicted)
    assert p2.status["preemptions"] == 1 and p2.workload_patch is None
    gone = pod(phase="Failed", exit_code=143, deleting_since=T0)
    p3 = run(job, p2.status, [gone], queue=evicted)
    assert p3.status["preemptions"] == 1 and p3.status["failures"] == 0
    patch = p3.workload_patch
    assert patch is not None and patch["admission"] is None
    conds = {c["type"]: (c["status"], c["reason"]) for c in patch["conditions"]}
    assert conds["QuotaReserved"] == ("False", "Pending") and conds["Requeued"] == ("True", "Preempted")
    assert conds["Admitted"] == ("False", "NoReservation")
    # Re-admitted: attempt 2 starts (it resumes from the checkpoint), nothing more is counted.
    p4 = run(job, p3.status, [gone], queue=admitted)
    assert pods_created(p4) == ["demo-a2-0"] and p4.status["phase"] == "Restarting"
    assert p4.status["preemptions"] == 1


def test_other_evictions_count_as_kueue_evicted():
    job = make_job()
    admitted = queue(workload(*ADMITTED, flavor="gpu"))
    st = run(job, run(job, {}, [], queue=admitted).status, [pod()], queue=admitted).status
    stopped = ("Evicted", True, "ClusterQueueStopped", "The ClusterQueue is stopped")
    p = run(job, st, [pod()], queue=queue(workload(*ADMITTED, stopped, flavor="gpu")))
    assert p.status["preemptionsByReason"] == {"KueueEvicted": 1} and p.status["failures"] == 0


def test_a_finished_job_finishes_its_workload():
    job = make_job()
    admitted = queue(workload(*ADMITTED, flavor="gpu"))
    st = run(job, run(job, {}, [], queue=admitted).status, [pod()], queue=admitted).status
    done = run(job, st, [pod(phase="Succeeded", exit_code=0)], queue=admitted)
    assert done.status["phase"] == "Succeeded"
    # In the same plan that ends the job: the quota goes back without waiting for another reconcile.
    conds = {c["type"]: (c["status"], c["reason"]) for c in done.workload_patch["conditions"]}
    assert conds["Finished"] == ("True", "Succeeded")
    finished = queue(workload(*ADMITTED, ("Finished", True, "Succeeded", ""), flavor="gpu"))
    assert run(job, done.status, [pod(phase="Succeeded", exit_code=0)], queue=finished).workload_patch is None


def test_an_unknown_priority_class_says_so_and_creates_nothing():
    job = make_job()
    p = run(
        job,
        {},
        [],
        queue=queue(
            None,
            priority_class="urgent",
            error="WorkloadPriorityClass urgent (label kueue.x-k8s.io/priority-class) does not exist",
        ),
    )
    assert p.workload_create is None and pods_created(p) == []
    assert get_condition(p.status, "Queued")["reason"] == "QueueConfigError"
    assert "WorkloadPriorityClass urgent" in p.status["message"]


def test_workload_names_are_per_job_object_and_valid():
    job = make_job()
    assert kueue.workload_name(job) == "finetunejob-demo-u-1"
    again = replace(job, ref=replace(job.ref, uid="u-2"))  # the same name re-created: a new Workload
    assert kueue.workload_name(again) != kueue.workload_name(job)
    long = replace(job, ref=replace(job.ref, name="x" * 253))
    assert len(kueue.workload_name(long)) == 253


def test_kueue_preemptions_count_against_max_preemptions():
    job = make_job(maxPreemptions=0)
    admitted = queue(workload(*ADMITTED, flavor="gpu"))
    st = run(job, run(job, {}, [], queue=admitted).status, [pod()], queue=admitted).status
    p = run(job, st, [pod()], queue=queue(workload(*ADMITTED, PREEMPTED, flavor="gpu")))
    assert p.status["phase"] == "Failed" and p.status["failures"] == 0
    assert get_condition(p.status, "Failed")["reason"] == "TooManyPreemptions"
    assert p.status["preemptionsByReason"] == {"KueuePreempted": 1}


def _pods_ready(patch) -> tuple[str, str] | None:
    if patch is None:
        return None
    c = next(c for c in patch["conditions"] if c["type"] == "PodsReady")
    return c["status"], c["reason"]


def test_pods_ready_follows_the_attempt_so_waitforpodsready_does_not_evict_a_running_job():
    """Kueue's waitForPodsReady evicts an admitted Workload whose PodsReady is not True in time: the
    condition is set as Kueue's own job reconciler sets it (Started, WaitForRecovery, Recovered)."""
    job = make_job(workers=2)
    admitted = queue(workload(*ADMITTED, flavor="gpu"))
    p1 = run(job, {}, [], queue=admitted)
    assert p1.workload_patch is None  # no pod yet: a missing condition already reads as WaitForStart
    half = [pod(rank=0, ready=True), pod(rank=1, phase="Pending")]
    p2 = run(job, p1.status, half, queue=admitted)
    assert p2.workload_patch is None  # one of two ranks is not Ready: still WaitForStart
    both = [pod(rank=0, ready=True), pod(rank=1, ready=True)]
    p3 = run(job, p2.status, both, queue=admitted)
    assert _pods_ready(p3.workload_patch) == ("True", "Started")
    started = queue(workload(*ADMITTED, ("PodsReady", True, "Started", ""), flavor="gpu"))
    assert run(job, p3.status, both, queue=started).workload_patch is None  # already says so
    # A rank is lost (e.g. its node): while the gang restarts, Kueue's recoveryTimeout counts.
    lost = [pod(rank=0, ready=True), pod(rank=1, gone=True)]
    p4 = run(job, p3.status, lost, queue=started)
    assert p4.status["phase"] == "Restarting"
    assert _pods_ready(p4.workload_patch) == ("False", "WaitForRecovery")
    recovering = queue(workload(*ADMITTED, ("PodsReady", False, "WaitForRecovery", ""), flavor="gpu"))
    old = [pod(rank=0, gone=True), pod(rank=1, gone=True)]
    p5 = run(job, p4.status, old, queue=recovering)  # the gang has stopped: attempt 2 is created
    assert pods_created(p5) == ["demo-a2-0", "demo-a2-1"] and p5.workload_patch is None
    again = [pod(attempt=2, rank=0, ready=True), pod(attempt=2, rank=1, ready=True)]
    p6 = run(job, p5.status, [*old, *again], queue=recovering)
    assert _pods_ready(p6.workload_patch) == ("True", "Recovered")


def test_a_pods_ready_timeout_eviction_stops_the_job_and_resets_pods_ready():
    job = make_job()
    admitted = queue(workload(*ADMITTED, flavor="gpu"))
    st = run(job, run(job, {}, [], queue=admitted).status, [pod(phase="Pending")], queue=admitted).status
    timeout = ("Evicted", True, "PodsReadyTimeout", "Exceeded the PodsReady timeout ns/wl")
    evicted = queue(workload(*ADMITTED, ("PodsReady", False, "WaitForStart", ""), timeout, flavor="gpu"))
    p = run(job, st, [pod(phase="Pending")], queue=evicted)
    assert p.delete_pods == ("demo-a1-0",) and p.status["phase"] == "Queued"
    assert p.status["preemptionsByReason"] == {"KueueEvicted": 1} and p.status["failures"] == 0
    assert "Exceeded the PodsReady timeout" in p.status["message"]
    gone = pod(phase="Failed", exit_code=143, deleting_since=T0)
    patch = run(job, p.status, [gone], queue=evicted).workload_patch
    conds = {c["type"]: (c["status"], c["reason"]) for c in patch["conditions"]}
    assert conds["PodsReady"] == ("False", "WaitForStart")  # the next admission's timeout starts afresh
    assert conds["Requeued"] == ("False", "PodsReadyTimeout")  # Kueue's backoff then requeues it


def test_a_suspended_job_deactivates_its_workload_and_hands_the_quota_back_without_counting():
    job = make_job()
    admitted = queue(workload(*ADMITTED, flavor="gpu"))
    st = run(job, run(job, {}, [], queue=admitted).status, [pod()], queue=admitted).status
    held = replace(job, spec=replace(job.spec, run_policy=replace(job.spec.run_policy, suspend=True)))
    p = run(held, st, [pod()], queue=admitted)
    assert p.delete_pods == ("demo-a1-0",) and p.status["phase"] == "Suspended"
    assert p.workload_active is False  # Kueue evicts a deactivated Workload and admits it no more
    assert p.workload_patch is None  # the quota stays until the pod has stopped
    deactivated = ("Evicted", True, "Deactivated", "The workload is deactivated")
    inactive = replace(workload(*ADMITTED, deactivated, flavor="gpu"), active=False)
    gone = pod(phase="Failed", exit_code=143, deleting_since=T0)
    p2 = run(held, p.status, [gone], queue=queue(inactive))
    assert p2.workload_active is None  # already inactive
    conds = {c["type"]: (c["status"], c["reason"]) for c in p2.workload_patch["conditions"]}
    assert conds["QuotaReserved"] == ("False", "Pending") and conds["Requeued"] == ("False", "Deactivated")
    assert (
        p2.status["preemptions"] == 0 and p2.status["failures"] == 0 and not p2.status["preemptionsByReason"]
    )
    # Unsuspended: the Workload is activated and the job queues again; nothing is counted.
    unadmitted = replace(workload(deactivated), active=False)
    p3 = run(job, p2.status, [gone], queue=queue(unadmitted))
    assert p3.workload_active is True and p3.status["phase"] == "Queued" and pods_created(p3) == []
    assert p3.status["preemptions"] == 0
    p4 = run(job, p3.status, [gone], queue=admitted)
    assert pods_created(p4) == ["demo-a2-0"] and p4.status["preemptions"] == 0


def _checked(*updates: dict) -> kueue.WorkloadView:
    base = workload(*ADMITTED, flavor="gpu")
    body = {
        "metadata": {"name": base.name, "resourceVersion": "8"},
        "status": {
            "conditions": list(base.raw_conditions),
            "admission": {
                "clusterQueue": "cq",
                "podSetAssignments": [{"name": "trainer", "flavors": {"nvidia.com/gpu": "gpu"}}],
            },
            "admissionChecks": [
                {"name": f"check-{i}", "state": "Ready", "podSetUpdates": [u]} for i, u in enumerate(updates)
            ],
        },
    }
    return kueue.workload_view(body)


def test_admission_checks_pod_set_updates_go_on_the_pods_as_kueue_merges_them():
    job = make_job()
    wl = _checked(
        {
            "name": "trainer",
            "labels": {"team": "a", "kubetune.io/job-name": "not-ours"},
            "annotations": {"provisioned-by": "check-0"},
            "nodeSelector": {"zone": "z1"},
            "tolerations": [{"key": "spot", "operator": "Exists"}],
        },
        {"name": "other-pod-set", "labels": {"ignored": "yes"}},
    )
    p = run(job, {}, [], queue=queue(wl))
    pod_obj = next(o for o in p.create if o["kind"] == "Pod")
    assert pod_obj["spec"]["nodeSelector"] == {"pool": "gpu", "zone": "z1"}
    assert {"key": "spot", "operator": "Exists"} in pod_obj["spec"]["tolerations"]
    assert {"key": "gpu", "operator": "Exists"} in pod_obj["spec"]["tolerations"]
    labels = pod_obj["metadata"]["labels"]
    assert labels["team"] == "a" and "ignored" not in labels
    assert labels["kubetune.io/job-name"] == "demo"  # the operator's own labels win
    assert pod_obj["metadata"]["annotations"]["provisioned-by"] == "check-0"


def test_a_pod_set_update_that_contradicts_the_flavor_holds_the_job_and_says_which():
    job = make_job()
    wl = _checked({"name": "trainer", "nodeSelector": {"pool": "cpu"}})
    p = run(job, {}, [], queue=queue(wl))
    assert pods_created(p) == [] and p.status["phase"] == "Queued"
    cond = get_condition(p.status, "Queued")
    assert cond["reason"] == "PodSetUpdateConflict"
    assert "admission check 'check-0' sets nodeSelector pool='cpu', which is already 'gpu'" in cond["message"]
