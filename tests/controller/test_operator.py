"""The operator against the real control plane: kube-apiserver, scheduler, controller manager and kwok
nodes. Pod outcomes are reported as the kubelet would (status patches on kwok pods) or caused for real
(scheduler preemption, the Eviction API, node deletion and PodGC); the operator runs as a real process."""

from __future__ import annotations

import json
import signal
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeutil import (
    NotYet,
    create_kwok_node,
    dedicated_toleration,
    delete_node_if_exists,
    fake_pod,
    patch_pod_terminated,
    wait_for,
)
from opkit import apply, job_manifest

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"


@pytest.fixture
def custom(api_client: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def get_job(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def wait_status(custom, ns, name, pred, desc, timeout=30.0) -> dict[str, Any]:
    def check():
        st = get_job(custom, ns, name).get("status") or {}
        return st if pred(st) else NotYet(json.dumps(st, sort_keys=True)[:1500])

    return wait_for(check, timeout=timeout, desc=f"{ns}/{name}: {desc}")


def pod_names(core, ns) -> list[str]:
    return sorted(p.metadata.name for p in core.list_namespaced_pod(ns).items)


def wait_pod(core, ns, name, phase="Running", timeout=30.0):
    def check():
        try:
            pod = core.read_namespaced_pod(name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return NotYet("absent")
            raise
        return pod if pod.status.phase == phase else NotYet(pod.status.phase)

    return wait_for(check, timeout=timeout, desc=f"pod {ns}/{name} {phase}")


def events(core, ns, name) -> list[tuple[str, str]]:
    items = core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}").items
    return [(e.reason, e.message) for e in items]


def report(reason: str, step: int, ckpt: int, total: int = 100, message: str = "") -> str:
    return json.dumps(
        {"reason": reason, "step": step, "totalSteps": total, "epoch": 0, "checkpoint": f"/checkpoints/step-{ckpt}",
         "checkpointStep": ckpt, "message": message}
    )  # fmt: skip


def running_job(kube, custom, core, ns, name="ft", **spec) -> dict[str, Any]:
    apply(kube, ns, job_manifest(name, **spec))
    wait_pod(core, ns, f"{name}-a1-0")
    return wait_status(custom, ns, name, lambda s: s.get("phase") == "Running", "Running")


def test_job_runs_to_success_and_shows_columns(kube, operator, custom, core_v1, namespace):
    st = running_job(kube, custom, core_v1, namespace)
    assert st["attempt"] == 1 and st["preemptions"] == 0 and st["failures"] == 0
    assert st["wandb"]["runId"].startswith("ftj-")
    pvc = core_v1.read_namespaced_persistent_volume_claim("ft-ckpt", namespace)
    assert pvc.metadata.owner_references[0].kind == "FineTuneJob"
    cm = core_v1.read_namespaced_config_map("ft-job", namespace)
    assert "test_resnet" in cm.data["job.yaml"]
    patch_pod_terminated(core_v1, namespace, "ft-a1-0", 0, "Completed", report("Completed", 100, 100))
    st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Succeeded", "Succeeded")
    assert st["progress"]["percent"] == 100 and st["checkpoint"]["step"] == 100 and st["completionTime"]
    out = kube.kubectl("get", "ftj", "ft", "-n", namespace).stdout
    header, row = out.splitlines()[:2]
    for col in ("PHASE", "PROGRESS", "EPOCH", "STEP", "CHECKPOINT", "PREEMPTIONS", "FAILURES", "AGE"):
        assert col in header
    assert row.split()[:3] == ["ft", "Succeeded", "100"]
    kube.kubectl("wait", "--for=condition=Succeeded", "ftj/ft", "-n", namespace, "--timeout=5s")


def test_scheduler_preemption_restarts_without_spending_failures(kube, operator, custom, core_v1, namespace):
    node = f"kwok-preempt-{namespace[-6:]}"
    sched = client.SchedulingV1Api(core_v1.api_client)
    low, high = f"low-{namespace[-6:]}", f"high-{namespace[-6:]}"
    sched.create_priority_class({"metadata": {"name": low}, "value": 100})
    sched.create_priority_class({"metadata": {"name": high}, "value": 100000})
    create_kwok_node(core_v1, node, gpus=8)
    try:
        running_job(
            kube, custom, core_v1, namespace,
            resources={"gpus": 8}, priorityClassName=low, nodeSelector={"kubernetes.io/hostname": node},
            tolerations=[dedicated_toleration(node)], runPolicy={"backoffLimit": 0},
        )  # fmt: skip
        hog = fake_pod("hog", gpus=8, priorityClassName=high, nodeSelector={"kubernetes.io/hostname": node},
                       tolerations=[dedicated_toleration(node)])  # fmt: skip
        core_v1.create_namespaced_pod(namespace, hog)
        st = wait_status(custom, namespace, "ft", lambda s: s.get("preemptions") == 1, "one preemption")
        assert st["failures"] == 0 and st["attempt"] == 2
        assert st["preemptionsByReason"] == {"PreemptionByScheduler": 1}
        assert st["lastDisruption"]["reason"] == "PreemptionByScheduler"
        assert st["lastDisruption"]["pod"] == "ft-a1-0"
        wait_for(lambda: "ft-a2-0" in pod_names(core_v1, namespace), timeout=10, desc="replacement pod")
        msgs = [m for r, m in events(core_v1, namespace, "ft") if r == "Preempted"]
        assert msgs and "ft-a1-0" in msgs[0] and "PreemptionByScheduler" in msgs[0]
        cond = {c["type"]: c for c in st["conditions"]}
        assert (
            cond["Restarting"]["status"] == "True" and cond["Restarting"]["reason"] == "PreemptionByScheduler"
        )
        assert 'kubetune_preemptions_total{reason="PreemptionByScheduler"} 1.0' in operator.metrics()
    finally:
        delete_node_if_exists(core_v1, node)
        sched.delete_priority_class(low)
        sched.delete_priority_class(high)


def test_eviction_is_a_disruption(kube, operator, custom, core_v1, namespace):
    running_job(kube, custom, core_v1, namespace, runPolicy={"backoffLimit": 0})
    core_v1.create_namespaced_pod_eviction(
        "ft-a1-0", namespace, {"metadata": {"name": "ft-a1-0", "namespace": namespace}}
    )
    st = wait_status(custom, namespace, "ft", lambda s: s.get("preemptions") == 1, "one preemption")
    assert st["preemptionsByReason"] == {"EvictionByEvictionAPI": 1} and st["failures"] == 0
    wait_pod(core_v1, namespace, "ft-a2-0")
    wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Running", "Running again")


def test_node_deletion_and_podgc(kube, operator, custom, core_v1, namespace):
    node = f"kwok-gone-{namespace[-6:]}"
    create_kwok_node(core_v1, node, gpus=8)
    try:
        running_job(
            kube, custom, core_v1, namespace,
            nodeSelector={"kubernetes.io/hostname": node}, tolerations=[dedicated_toleration(node)],
        )  # fmt: skip
        core_v1.delete_node(node)
        st = wait_status(custom, namespace, "ft", lambda s: s.get("preemptions") == 1, "one preemption", 90)
        assert st["failures"] == 0
        assert set(st["preemptionsByReason"]) <= {"DeletionByPodGC", "PodDeleted"}
        wait_for(lambda: "ft-a2-0" in pod_names(core_v1, namespace), timeout=10, desc="replacement pod")
    finally:
        delete_node_if_exists(core_v1, node)


def test_user_delete_and_sigterm_count_as_preemptions(kube, operator, custom, core_v1, namespace):
    running_job(kube, custom, core_v1, namespace)
    core_v1.delete_namespaced_pod("ft-a1-0", namespace)
    wait_status(custom, namespace, "ft", lambda s: s.get("preemptions") == 1, "deleted pod counted")
    wait_pod(core_v1, namespace, "ft-a2-0")
    patch_pod_terminated(core_v1, namespace, "ft-a2-0", 143, "Error", report("Preempted", 60, 60))
    st = wait_status(custom, namespace, "ft", lambda s: s.get("preemptions") == 2, "SIGTERM counted")
    assert st["preemptionsByReason"] == {"PodDeleted": 1, "SIGTERM": 1}
    assert st["failures"] == 0 and st["lostSteps"] == 0 and st["checkpoint"]["step"] == 60
    wait_pod(core_v1, namespace, "ft-a3-0")


def test_failures_back_off_until_the_limit(kube, operator, custom, core_v1, namespace):
    running_job(kube, custom, core_v1, namespace, runPolicy={"backoffLimit": 1})
    patch_pod_terminated(core_v1, namespace, "ft-a1-0", 137, "OOMKilled")
    st = wait_status(custom, namespace, "ft", lambda s: s.get("failures") == 1, "first failure")
    assert st["preemptions"] == 0
    wait_pod(core_v1, namespace, "ft-a2-0")  # after the 1 s backoff
    patch_pod_terminated(core_v1, namespace, "ft-a2-0", 1, "Error", report("Error", 5, 0, message="boom"))
    st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Failed", "Failed")
    assert st["failures"] == 2 and "backoffLimit" in st["message"]
    assert "ft-a3-0" not in pod_names(core_v1, namespace)
    assert 'kubetune_pod_failures_total{cause="OOMKilled"} 1.0' in operator.metrics()


def test_invalid_config_fails_at_once(kube, operator, custom, core_v1, namespace):
    running_job(kube, custom, core_v1, namespace, runPolicy={"backoffLimit": 5})
    msg = "training.batchSize: 4096 is larger than the dataset (256 samples)"
    patch_pod_terminated(
        core_v1, namespace, "ft-a1-0", 2, "Error", report("InvalidConfig", 0, 0, message=msg)
    )
    st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Failed", "Failed")
    assert st["failures"] == 0 and "training.batchSize" in st["message"]


def test_suspend_resume_deadline_ttl(kube, operator, custom, core_v1, namespace):
    running_job(kube, custom, core_v1, namespace)
    kube.kubectl(
        "patch", "ftj", "ft", "-n", namespace, "--type=merge", "-p", '{"spec":{"runPolicy":{"suspend":true}}}'
    )
    wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Suspended", "Suspended")
    wait_for(lambda: "ft-a1-0" not in pod_names(core_v1, namespace), timeout=20, desc="pods gone")
    kube.kubectl(
        "patch",
        "ftj",
        "ft",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"spec":{"runPolicy":{"suspend":false}}}',
    )
    wait_pod(core_v1, namespace, "ft-a2-0")
    st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Running", "Running")
    assert st["preemptions"] == 0 and st["failures"] == 0
    kube.kubectl(
        "patch", "ftj", "ft", "-n", namespace, "--type=merge",
        "-p", '{"spec":{"runPolicy":{"activeDeadlineSeconds":1,"ttlSecondsAfterFinished":2}}}',
    )  # fmt: skip
    st = wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Failed", "deadline")
    assert "activeDeadlineSeconds" in st["message"]

    def deleted():
        try:
            get_job(custom, namespace, "ft")
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(deleted, timeout=30, desc="job deleted by TTL")
    wait_for(
        lambda: pod_names(core_v1, namespace) == [] or NotYet(pod_names(core_v1, namespace)),
        timeout=30,
        desc="pods garbage-collected",
    )


def test_gang_restarts_together(kube, operator, custom, core_v1, namespace):
    apply(kube, namespace, job_manifest("ddp", workers=2))
    wait_pod(core_v1, namespace, "ddp-a1-0")
    wait_pod(core_v1, namespace, "ddp-a1-1")
    svc = core_v1.read_namespaced_service("ddp-workers", namespace)
    assert svc.spec.cluster_ip == "None"
    wait_status(custom, namespace, "ddp", lambda s: s.get("phase") == "Running", "Running")
    core_v1.create_namespaced_pod_eviction(
        "ddp-a1-1", namespace, {"metadata": {"name": "ddp-a1-1", "namespace": namespace}}
    )
    wait_pod(core_v1, namespace, "ddp-a2-0")
    wait_pod(core_v1, namespace, "ddp-a2-1")
    st = wait_status(custom, namespace, "ddp", lambda s: s.get("phase") == "Running", "Running again")
    assert st["preemptions"] == 1 and st["attempt"] == 2 and st["failures"] == 0
    assert not {"ddp-a1-0", "ddp-a1-1"} & set(pod_names(core_v1, namespace))


def test_missing_dataset_claim_waits_with_a_reason(kube, operator, custom, core_v1, namespace):
    apply(kube, namespace, job_manifest("ft", data={"format": "imagefolder", "claimName": "digits"}))
    st = wait_status(
        custom, namespace, "ft", lambda s: "digits" in (s.get("message") or ""), "waiting message"
    )
    assert st["phase"] == "Pending" and "spec.data.claimName" in st["message"]
    assert pod_names(core_v1, namespace) == []
    core_v1.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "digits"},
            "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    wait_for(lambda: "ft-a1-0" in pod_names(core_v1, namespace), timeout=30, desc="pod once the claim exists")


def test_operator_restart_never_duplicates_or_double_counts(kube, start_operator, custom, core_v1, namespace):
    op = start_operator()
    running_job(kube, custom, core_v1, namespace)
    op.stop(signal.SIGKILL)
    core_v1.delete_namespaced_pod("ft-a1-0", namespace, grace_period_seconds=0)
    wait_for(lambda: "ft-a1-0" not in pod_names(core_v1, namespace), timeout=20, desc="pod gone")
    op2 = start_operator()
    st = wait_status(
        custom,
        namespace,
        "ft",
        lambda s: s.get("preemptions") == 1 and s.get("phase") == "Running",
        "recovered",
        40,
    )
    assert st["attempt"] == 2
    op2.stop(signal.SIGKILL)
    start_operator()
    wait_status(custom, namespace, "ft", lambda s: s.get("phase") == "Running", "still Running")
    assert pod_names(core_v1, namespace) == ["ft-a2-0"]
    assert get_job(custom, namespace, "ft")["status"]["preemptions"] == 1


def test_two_replicas_only_the_leader_acts(kube, start_operator, custom, core_v1, namespace):
    first = start_operator()
    second = start_operator()
    running_job(kube, custom, core_v1, namespace)
    core_v1.delete_namespaced_pod("ft-a1-0", namespace, grace_period_seconds=0)
    wait_status(
        custom, namespace, "ft", lambda s: s.get("phase") == "Running" and s.get("attempt") == 2, "recovered"
    )
    assert get_job(custom, namespace, "ft")["status"]["preemptions"] == 1
    assert pod_names(core_v1, namespace) == ["ft-a2-0"]
    counted = [op for op in (first, second) if "kubetune_preemptions_total{" in op.metrics()]
    assert len(counted) == 1, "exactly one replica (the leader) acted"
    # The leader goes away; the follower takes over within the lease duration.
    counted[0].stop(signal.SIGKILL)
    core_v1.delete_namespaced_pod("ft-a2-0", namespace, grace_period_seconds=0)
    wait_status(
        custom, namespace, "ft", lambda s: s.get("attempt") == 3 and s.get("preemptions") == 2, "failover", 40
    )


def test_deleting_the_job_cascades(kube, operator, custom, core_v1, namespace):
    running_job(kube, custom, core_v1, namespace)
    kube.kubectl("delete", "ftj", "ft", "-n", namespace, "--wait=true", "--timeout=30s")
    wait_for(
        lambda: pod_names(core_v1, namespace) == [] or NotYet(pod_names(core_v1, namespace)),
        timeout=30,
        desc="pods removed",
    )

    def pvc_gone():
        try:
            core_v1.read_namespaced_persistent_volume_claim("ft-ckpt", namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    wait_for(pvc_gone, timeout=30, desc="checkpoint PVC removed")
