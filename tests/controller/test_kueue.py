"""FineTuneJobs queued through the real Kueue (v0.17.0, built from Go modules, started on the local
cluster by `hack/cluster.sh kueue up`): admission, priority preemption that costs no failure budget,
re-admission, the flavor's placement, and Kueue's own words when a job cannot be admitted.

One ClusterQueue with an `nvidia.com/gpu` quota of 8 (scoped to the test's namespace), one LocalQueue,
two WorkloadPriorityClasses, one ResourceFlavor whose node labels and toleration lead to a dedicated
fake node with 8 GPUs: a pod without the flavor's placement cannot schedule there."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from kubeutil import (
    CLUSTER_SH,
    dedicated_toleration,
    holds_for,
    kueue_queue_objects,
    patch_pod_terminated,
    wait_for,
)
from opkit import OperatorProcess, apply, job_manifest

pytestmark = pytest.mark.cluster

GROUP, VERSION = "kubetune.io", "v1alpha1"
KQ = "kueue.x-k8s.io"


# Kueue's waitForPodsReady, short enough for a test to see a timeout (`kueue up` restarts a Kueue that
# runs with other values). kwok pods are Ready within a second of being bound.
PODS_READY_TIMEOUT_S = 15
KUEUE_ENV = {
    "KUBETUNE_KUEUE_PODS_READY_TIMEOUT": f"{PODS_READY_TIMEOUT_S}s",
    "KUBETUNE_KUEUE_REQUEUE_BASE_SECONDS": "1",
}


def cluster_sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **KUEUE_ENV},
    )


@pytest.fixture(scope="module")
def kueue(kube: Any) -> Iterator[Any]:
    if not kube.local:
        pytest.skip("needs the local cluster (hack/cluster.sh starts Kueue)")
    running = cluster_sh("kueue", "status").returncode == 0
    up = cluster_sh("kueue", "up")
    assert up.returncode == 0, f"hack/cluster.sh kueue up failed:\n{up.stderr}\n{up.stdout}"
    yield kube
    if not running:
        cluster_sh("kueue", "down")


def kapply(kube: Any, obj: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps(obj))


@pytest.fixture
def queues(kueue: Any, namespace: str, kwok_node: Any) -> Iterator[dict[str, str]]:
    node = kwok_node(gpus=8, labels={"kubetune.io/pool": namespace})
    tag = namespace[-6:]  # the namespace's random suffix: cluster-scoped names stay short and unique
    names = {
        "flavor": f"gpu-{tag}",
        "cq": f"cq-{tag}",
        "lq": "team",
        "low": f"low-{tag}",
        "high": f"high-{tag}",
        "node": node,
    }
    objs = kueue_queue_objects(names, namespace, dedicated_toleration(node))
    for obj in objs:
        kapply(kueue, obj)
    yield names
    for kind, name in (
        ("clusterqueue", names["cq"]),
        ("resourceflavor", names["flavor"]),
        ("workloadpriorityclass", names["low"]),
        ("workloadpriorityclass", names["high"]),
    ):
        kueue.kubectl("delete", f"{kind}.{KQ}", name, "--ignore-not-found", "--wait=false", check=False)


@pytest.fixture
def operator(kueue: Any, crd: None, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(Path(kueue.kubeconfig), namespace, tmp_path / "operator.log").start()
    yield op
    op.stop()


def queued_job(
    name: str, queue: str, priority: str | None = None, gpus: int = 8, **spec: Any
) -> dict[str, Any]:
    m = job_manifest(name, resources={"gpus": gpus}, tolerations=[], **spec)
    m["metadata"]["labels"] = {f"{KQ}/queue-name": queue}
    if priority:
        m["metadata"]["labels"][f"{KQ}/priority-class"] = priority
    return m


def status(api: client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", name)
    return obj.get("status") or {}


def workloads(api: client.ApiClient, ns: str) -> list[dict[str, Any]]:
    return client.CustomObjectsApi(api).list_namespaced_custom_object(KQ, "v1beta2", ns, "workloads")["items"]


def pods_ready(api: client.ApiClient, ns: str, job: str) -> tuple[str, str] | None:
    for w in workloads(api, ns):
        if w["metadata"]["ownerReferences"][0]["name"] == job:
            for c in (w.get("status") or {}).get("conditions") or []:
                if c["type"] == "PodsReady":
                    return c["status"], c["reason"]
    return None


def phase_is(api: Any, ns: str, name: str, phase: str) -> dict[str, Any] | None:
    st = status(api, ns, name)
    return st if st.get("phase") == phase else None


def running_pod(core: client.CoreV1Api, ns: str, name: str, attempt: int) -> client.V1Pod | None:
    try:
        pod = core.read_namespaced_pod(f"{name}-a{attempt}-0", ns)
    except client.ApiException:
        return None
    return pod if pod.status.phase == "Running" else None


def test_kueue_preemption_costs_no_failure_and_the_job_resumes_when_readmitted(
    queues: dict[str, str],
    operator: OperatorProcess,
    namespace: str,
    api_client: Any,
    core_v1: Any,
    kueue: Any,
) -> None:
    ns = namespace
    apply(kueue, ns, queued_job("low", queues["lq"], queues["low"], runPolicy={"backoffLimit": 0}))
    pod = wait_for(lambda: running_pod(core_v1, ns, "low", 1), timeout=60, desc="low admitted and running")
    # The admitted flavor's placement is on the pod (the dedicated node accepts nothing else).
    assert pod.spec.node_selector.get("kubetune.io/pool") == ns and pod.spec.node_name == queues["node"]
    st = wait_for(lambda: phase_is(api_client, ns, "low", "Running"), timeout=30, desc="low Running")
    assert st["kueue"]["admitted"] is True and st["kueue"]["clusterQueue"] == queues["cq"]
    [wl] = workloads(api_client, ns)
    assert wl["spec"]["podSets"][0]["count"] == 1 and wl["spec"]["priority"] == 100
    # Its pod is Ready, so the Workload says PodsReady (else waitForPodsReady would evict it).
    wait_for(lambda: pods_ready(api_client, ns, "low") == ("True", "Started"), timeout=30, desc="PodsReady")

    apply(kueue, ns, queued_job("high", queues["lq"], queues["high"]))
    st = wait_for(
        lambda: phase_is(api_client, ns, "low", "Queued"), timeout=60, desc="low preempted by Kueue"
    )
    assert st["preemptionsByReason"] == {"KueuePreempted": 1}
    assert st["failures"] == 0 and st["lostSteps"] == 0 and st["attempt"] == 2
    wait_for(lambda: running_pod(core_v1, ns, "high", 1), timeout=60, desc="high admitted once low let go")
    st = status(api_client, ns, "low")
    assert st["phase"] == "Queued" and not st["kueue"]["admitted"]
    assert not [p for p in core_v1.list_namespaced_pod(ns, label_selector="kubetune.io/job-name=low").items
                if p.status.phase in ("Pending", "Running")]  # fmt: skip
    events = kueue.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=low", "-o", "json"
    )
    assert any("Kueue took the job's quota" in e["message"] for e in json.loads(events.stdout)["items"])

    # The flavor changes while the operator runs (a new node label, which the node has too): the next
    # attempt's pods carry it (the operator watches ResourceFlavors).
    core_v1.patch_node(queues["node"], {"metadata": {"labels": {"kubetune.io/rev": "2"}}})
    kueue.kubectl(
        "patch", f"resourceflavor.{KQ}", queues["flavor"], "--type=merge",
        "-p", json.dumps({"spec": {"nodeLabels": {"kubetune.io/pool": ns, "kubetune.io/rev": "2"}}}),
    )  # fmt: skip
    patch_pod_terminated(core_v1, ns, "high-a1-0", 0, "Completed")
    wait_for(lambda: phase_is(api_client, ns, "high", "Succeeded"), timeout=60, desc="high Succeeded")
    pod2 = wait_for(
        lambda: running_pod(core_v1, ns, "low", 2), timeout=60, desc="low re-admitted: attempt 2 runs"
    )
    assert pod2.spec.node_selector == {"kubetune.io/pool": ns, "kubetune.io/rev": "2"}, (
        pod2.spec.node_selector
    )
    high_wl = next(
        w for w in workloads(api_client, ns) if w["metadata"]["ownerReferences"][0]["name"] == "high"
    )
    assert any(c["type"] == "Finished" and c["status"] == "True" for c in high_wl["status"]["conditions"])
    st = wait_for(lambda: phase_is(api_client, ns, "low", "Running"), timeout=30, desc="low Running again")
    assert (
        st["preemptions"] == 1 and st["failures"] == 0 and st["preemptionsByReason"] == {"KueuePreempted": 1}
    )


def test_a_missing_local_queue_and_an_impossible_request_say_so(
    queues: dict[str, str], operator: OperatorProcess, namespace: str, api_client: Any, kueue: Any
) -> None:
    ns = namespace
    apply(kueue, ns, queued_job("lost", "no-such-queue"))
    apply(kueue, ns, queued_job("huge", queues["lq"], gpus=8, workers=2))  # 16 of 8
    st = wait_for(
        lambda: (s := phase_is(api_client, ns, "lost", "Queued")) and "doesn't exist" in s["message"] and s,
        timeout=60, desc="lost: Kueue's reason",
    )  # fmt: skip
    assert "LocalQueue no-such-queue" in st["message"], st["message"]
    st = wait_for(
        lambda: (s := phase_is(api_client, ns, "huge", "Queued")) and "quota" in s["message"] and s,
        timeout=60, desc="huge: Kueue's reason",
    )  # fmt: skip
    assert "nvidia.com/gpu" in st["message"], st["message"]
    # A queued job deleted leaves no Workload behind (it is owned by the job).
    kueue.kubectl("delete", "finetunejob", "huge", "lost", "-n", ns)
    wait_for(lambda: not workloads(api_client, ns), timeout=60, desc="workloads garbage-collected")


def test_a_two_worker_gang_is_admitted_whole_or_not_at_all(
    queues: dict[str, str],
    operator: OperatorProcess,
    namespace: str,
    api_client: Any,
    core_v1: Any,
    kueue: Any,
) -> None:
    ns = namespace
    apply(kueue, ns, queued_job("fits", queues["lq"], gpus=4, workers=2))
    wait_for(lambda: phase_is(api_client, ns, "fits", "Running"), timeout=60, desc="2 x 4 GPUs admitted")
    apply(kueue, ns, queued_job("waits", queues["lq"], gpus=1, workers=2))
    st = wait_for(lambda: phase_is(api_client, ns, "waits", "Queued"), timeout=30, desc="second gang waits")
    pods = core_v1.list_namespaced_pod(ns, label_selector="kubetune.io/job-name=waits").items
    assert pods == [] and "LocalQueue team" in st["message"]
    [wl] = [w for w in workloads(api_client, ns) if w["metadata"]["ownerReferences"][0]["name"] == "waits"]
    assert wl["spec"]["podSets"][0]["count"] == 2
    # An operator restart while queued: the same Workload (same uid: the queue position is kept), no twin.
    operator.stop()
    operator.start()
    st = wait_for(lambda: phase_is(api_client, ns, "waits", "Queued"), timeout=30, desc="still Queued")
    mine = [w for w in workloads(api_client, ns) if w["metadata"]["ownerReferences"][0]["name"] == "waits"]
    assert [w["metadata"]["uid"] for w in mine] == [wl["metadata"]["uid"]]
    # The first gang ends: the second is admitted and both its pods start.
    for rank in (0, 1):
        patch_pod_terminated(core_v1, ns, f"fits-a1-{rank}", 0, "Completed")
    wait_for(lambda: phase_is(api_client, ns, "waits", "Running"), timeout=60, desc="second gang admitted")
    started = core_v1.list_namespaced_pod(ns, label_selector="kubetune.io/job-name=waits").items
    assert sorted(p.metadata.name for p in started) == ["waits-a1-0", "waits-a1-1"]


def test_a_pods_ready_timeout_is_an_eviction_not_a_failure_and_a_ready_job_outlives_it(
    queues: dict[str, str],
    operator: OperatorProcess,
    namespace: str,
    api_client: Any,
    core_v1: Any,
    kueue: Any,
) -> None:
    """Kueue runs with waitForPodsReady (15 s here): a job whose pod never gets Ready is evicted by Kueue,
    stopped, counted KueueEvicted (not a failure) and requeued; a job whose pods are Ready keeps running
    past the timeout."""
    ns = namespace
    apply(kueue, ns, queued_job("ready", queues["lq"], gpus=4))
    # Admitted, but its pod can never schedule: no node has this label.
    apply(kueue, ns, queued_job("stuck", queues["lq"], gpus=4, nodeSelector={"kubetune.io/none": "x"}))
    wait_for(lambda: running_pod(core_v1, ns, "ready", 1), timeout=60, desc="ready runs")
    st = wait_for(
        lambda: (s := status(api_client, ns, "stuck")).get("preemptionsByReason") and s,
        timeout=PODS_READY_TIMEOUT_S + 45,
        desc="stuck evicted by Kueue's PodsReady timeout",
    )
    assert st["preemptionsByReason"] == {"KueueEvicted": 1} and st["failures"] == 0, st
    assert st["phase"] == "Queued" and "Exceeded the PodsReady timeout" in st["message"], st["message"]
    wait_for(
        lambda: not core_v1.list_namespaced_pod(ns, label_selector="kubetune.io/job-name=stuck,kubetune.io/attempt=1").items,
        timeout=60, desc="stuck's attempt 1 pod deleted",
    )  # fmt: skip

    # Both were admitted together, so the ready job is past the timeout too: its Workload said PodsReady
    # in time, and it was never evicted.
    def untouched() -> bool:
        st = status(api_client, ns, "ready")
        return st["phase"] == "Running" and not st.get("preemptionsByReason")

    holds_for(untouched, 3, desc="the ready job runs on")
    assert pods_ready(api_client, ns, "ready") == ("True", "Started")


def test_suspending_a_queued_job_hands_its_quota_on_and_unsuspending_queues_it_again(
    queues: dict[str, str],
    operator: OperatorProcess,
    namespace: str,
    api_client: Any,
    core_v1: Any,
    kueue: Any,
) -> None:
    ns = namespace
    custom = client.CustomObjectsApi(api_client)

    def suspend(name: str, value: bool) -> None:
        body = {"spec": {"runPolicy": {"suspend": value}}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, "finetunejobs", name, body)

    def active(name: str) -> bool:
        [wl] = [w for w in workloads(api_client, ns) if w["metadata"]["ownerReferences"][0]["name"] == name]
        return wl["spec"].get("active", True) is not False

    apply(kueue, ns, queued_job("first", queues["lq"]))
    wait_for(lambda: running_pod(core_v1, ns, "first", 1), timeout=60, desc="first runs")
    apply(kueue, ns, queued_job("next", queues["lq"]))
    wait_for(lambda: phase_is(api_client, ns, "next", "Queued"), timeout=30, desc="next waits for the quota")
    suspend("first", True)
    st = wait_for(lambda: phase_is(api_client, ns, "first", "Suspended"), timeout=30, desc="first Suspended")
    assert not active("first")  # deactivated: Kueue evicts it and admits it no more
    # Its pod checkpointed and stopped (kwok ends it as the kubelet would), then the quota went on.
    wait_for(lambda: running_pod(core_v1, ns, "next", 1), timeout=60, desc="next admitted with first's quota")
    suspend("first", False)
    wait_for(lambda: active("first"), timeout=30, desc="first's Workload active again")
    st = wait_for(lambda: phase_is(api_client, ns, "first", "Queued"), timeout=30, desc="first queued again")
    patch_pod_terminated(core_v1, ns, "next-a1-0", 0, "Completed")
    wait_for(lambda: running_pod(core_v1, ns, "first", 2), timeout=60, desc="first re-admitted: attempt 2")
    st = status(api_client, ns, "first")
    assert st["preemptions"] == 0 and st["failures"] == 0 and not st["preemptionsByReason"], st


def test_an_admission_checks_pod_set_updates_reach_the_pods(
    queues: dict[str, str],
    operator: OperatorProcess,
    namespace: str,
    api_client: Any,
    core_v1: Any,
    kueue: Any,
) -> None:
    """A ClusterQueue with an AdmissionCheck; the test plays that check's controller (as a provisioning
    controller would): it marks the check Active, and once Kueue reserved quota, Ready with podSetUpdates.
    Kueue then admits the Workload, and the pods carry the updates on top of the flavor's placement."""
    ns, tag = namespace, namespace[-6:]
    custom = client.CustomObjectsApi(api_client)
    check, cq = f"check-{tag}", f"cq-checked-{tag}"
    kapply(kueue, {"apiVersion": f"{KQ}/v1beta2", "kind": "AdmissionCheck", "metadata": {"name": check},
                   "spec": {"controllerName": "kubetune.io/test-check"}})  # fmt: skip
    now = "2026-01-01T00:00:00Z"
    active = {
        "type": "Active",
        "status": "True",
        "reason": "Active",
        "message": "",
        "lastTransitionTime": now,
    }
    custom.patch_cluster_custom_object_status(
        KQ, "v1beta2", "admissionchecks", check, {"status": {"conditions": [active]}}
    )
    kapply(kueue, {"apiVersion": f"{KQ}/v1beta2", "kind": "ClusterQueue", "metadata": {"name": cq},
                   "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
                            "admissionChecksStrategy": {"admissionChecks": [{"name": check}]},
                            "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                                                "flavors": [{"name": queues["flavor"], "resources": [
                                                    {"name": "cpu", "nominalQuota": "64"},
                                                    {"name": "memory", "nominalQuota": "256Gi"},
                                                    {"name": "nvidia.com/gpu", "nominalQuota": 8}]}]}]}})  # fmt: skip
    kapply(kueue, {"apiVersion": f"{KQ}/v1beta2", "kind": "LocalQueue",
                   "metadata": {"name": "checked", "namespace": ns}, "spec": {"clusterQueue": cq}})  # fmt: skip
    core_v1.patch_node(queues["node"], {"metadata": {"labels": {"kubetune.io/provisioned": "yes"}}})
    try:
        apply(kueue, ns, queued_job("checked", "checked", gpus=1))

        def pending_check() -> dict[str, Any] | None:
            for w in workloads(api_client, ns):
                states = (w.get("status") or {}).get("admissionChecks") or []
                if any(s["name"] == check and s["state"] == "Pending" for s in states):
                    return w
            return None

        wl = wait_for(pending_check, timeout=60, desc="quota reserved, the check Pending")
        assert not core_v1.list_namespaced_pod(ns, label_selector="kubetune.io/job-name=checked").items
        ready = {
            "name": check, "state": "Ready", "message": "provisioned", "lastTransitionTime": now,
            "podSetUpdates": [{"name": "trainer", "labels": {"kubetune.io/provisioned-by": check},
                               "nodeSelector": {"kubetune.io/provisioned": "yes"}}],
        }  # fmt: skip
        custom.patch_namespaced_custom_object_status(
            KQ, "v1beta2", ns, "workloads", wl["metadata"]["name"], {"status": {"admissionChecks": [ready]}}
        )
        pod = wait_for(
            lambda: running_pod(core_v1, ns, "checked", 1), timeout=60, desc="admitted after the check"
        )
        assert pod.spec.node_selector == {"kubetune.io/pool": ns, "kubetune.io/provisioned": "yes"}
        assert pod.metadata.labels["kubetune.io/provisioned-by"] == check
        assert pod.metadata.labels["kubetune.io/job-name"] == "checked"
    finally:
        kueue.kubectl("delete", "finetunejob", "checked", "-n", ns, "--ignore-not-found", check=False)
        kueue.kubectl("delete", f"clusterqueue.{KQ}", cq, "--ignore-not-found", "--wait=false", check=False)
        kueue.kubectl(
            "delete", f"admissioncheck.{KQ}", check, "--ignore-not-found", "--wait=false", check=False
        )
