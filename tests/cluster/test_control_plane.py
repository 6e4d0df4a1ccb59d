"""The local control plane behaves like a real cluster in the ways kubetune depends on: GPU nodes,
scheduling, scheduler preemption, the Eviction API, PodGC, and pod outcomes reported through status.

The disruption tests capture the DisruptionTarget condition from a pod watch: the control plane writes
it just before deleting the pod, and kwok removes deleted pods at once, so a poll could miss it.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from kubeutil import (
    GPU,
    SPOT_TOLERATION,
    condition_reason,
    dedicated_toleration,
    fake_pod,
    holds_for,
    patch_pod_terminated,
    pod_conditions,
    read_pod_or_none,
    record_pods,
    wait_for,
    wait_pod_gone,
    wait_pod_running,
)

pytestmark = pytest.mark.cluster

SPOT_GPU_NODES = {"kwok-gpu-0", "kwok-gpu-1"}
GPU_NODES = {*SPOT_GPU_NODES, "kwok-gpu-ondemand-0"}


def on_node(node: str, **spec: Any) -> dict[str, Any]:
    """Pod spec fields that pin a pod to a dedicated test node."""
    return {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": [dedicated_toleration(node)],
        **spec,
    }


@pytest.fixture
def priority_classes(api_client: Any) -> Iterator[tuple[str, str]]:
    """A (low, high) pair of PriorityClasses unique to this test, deleted afterwards."""
    sched = client.SchedulingV1Api(api_client)
    suffix = secrets.token_hex(3)
    names = (f"kubetune-test-low-{suffix}", f"kubetune-test-high-{suffix}")
    for name, value in zip(names, (1000, 1000000), strict=True):
        sched.create_priority_class(
            {"metadata": {"name": name}, "value": value, "preemptionPolicy": "PreemptLowerPriority"}
        )
    yield names
    for name in names:
        sched.delete_priority_class(name)


def test_gpu_nodes_ready_with_capacity(kube: Any) -> None:
    nodes = json.loads(kube.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    by_name = {n["metadata"]["name"]: n for n in nodes}
    assert by_name.keys() >= GPU_NODES, sorted(by_name)
    for name in GPU_NODES:
        node = by_name[name]
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True", name
        assert node["status"]["capacity"][GPU] == "8"
        assert node["status"]["allocatable"][GPU] == "8"
        spot = name in SPOT_GPU_NODES
        taints = {(t["key"], t.get("value"), t["effect"]) for t in node["spec"].get("taints", [])}
        assert (("cloud.google.com/gke-spot", "true", "NoSchedule") in taints) == spot, taints
        assert (node["metadata"]["labels"].get("cloud.google.com/gke-spot") == "true") == spot
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"
    if kube.local:
        assert version["serverVersion"]["gitVersion"] == "v1.34.4"


def test_gpu_pod_scheduled_to_gpu_node_and_running(core_v1: Any, namespace: str) -> None:
    pod = fake_pod("gpu", gpus=1, tolerations=[SPOT_TOLERATION])
    core_v1.create_namespaced_pod(namespace, pod)
    running = wait_pod_running(core_v1, namespace, "gpu")
    assert running.spec.node_name in GPU_NODES
    assert running.status.pod_ip
    assert running.status.container_statuses[0].state.running is not None


def test_spot_taint_keeps_gpu_pods_off_spot_nodes(core_v1: Any, namespace: str) -> None:
    core_v1.create_namespaced_pod(namespace, fake_pod("no-toleration", gpus=1))
    running = wait_pod_running(core_v1, namespace, "no-toleration")
    assert running.spec.node_name == "kwok-gpu-ondemand-0"


def _last_before_deleted(pods: Any, name: str) -> dict[str, Any]:
    """The last state of pod `name` a watch showed before its DELETED event."""
    states = [o for t, o in pods.seen(name) if t != "DELETED"]
    assert states, f"no state of {name} seen"
    return states[-1]


def test_scheduler_preemption_sets_disruption_target(
    core_v1: Any, namespace: str, kwok_node: Any, priority_classes: tuple[str, str]
) -> None:
    low, high = priority_classes
    node = kwok_node(gpus=8)
    core_v1.create_namespaced_pod(
        namespace, fake_pod("victim", gpus=8, priorityClassName=low, **on_node(node))
    )
    wait_pod_running(core_v1, namespace, "victim")

    with record_pods(core_v1, namespace) as pods:
        core_v1.create_namespaced_pod(
            namespace, fake_pod("preemptor", gpus=8, priorityClassName=high, **on_node(node))
        )
        cond = pods.wait_for_condition("victim", "DisruptionTarget", timeout=60)
        assert cond["reason"] == "PreemptionByScheduler", cond
        pods.wait_for_event("victim", "DELETED", timeout=30)
        last = _last_before_deleted(pods, "victim")
    # kwok ends it as the kubelet does: exit 143, Failed, Ready False, DisruptionTarget kept, then removed.
    assert last["status"]["phase"] == "Failed", last["status"]
    (cs,) = last["status"]["containerStatuses"]
    assert cs["state"]["terminated"]["exitCode"] == 143 and not cs["ready"]
    assert pod_conditions(last)["DisruptionTarget"]["reason"] == "PreemptionByScheduler"
    assert pod_conditions(last)["Ready"]["status"] == "False"

    preemptor = wait_pod_running(core_v1, namespace, "preemptor", timeout=60)
    assert preemptor.spec.node_name == node


def test_eviction_api_sets_disruption_target(core_v1: Any, namespace: str, kwok_node: Any) -> None:
    node = kwok_node(gpus=0)
    core_v1.create_namespaced_pod(namespace, fake_pod("evictee", **on_node(node)))
    wait_pod_running(core_v1, namespace, "evictee")

    with record_pods(core_v1, namespace) as pods:
        core_v1.create_namespaced_pod_eviction(
            "evictee",
            namespace,
            client.V1Eviction(metadata=client.V1ObjectMeta(name="evictee", namespace=namespace)),
        )
        cond = pods.wait_for_condition("evictee", "DisruptionTarget", timeout=30)
        assert cond["reason"] == "EvictionByEvictionAPI", cond
    wait_pod_gone(core_v1, namespace, "evictee")


@pytest.mark.slow
def test_podgc_deletes_pods_of_a_deleted_node(core_v1: Any, namespace: str, kwok_node: Any) -> None:
    # PodGC waits out a 40 s quarantine before it treats a missing node as gone, then runs every 20 s.
    node = kwok_node(gpus=8)
    core_v1.create_namespaced_pod(namespace, fake_pod("orphan", gpus=1, **on_node(node)))
    wait_pod_running(core_v1, namespace, "orphan")

    with record_pods(core_v1, namespace) as pods:
        core_v1.delete_node(node)
        cond = pods.wait_for_condition("orphan", "DisruptionTarget", timeout=150)
        assert cond["reason"] == "DeletionByPodGC", cond
        pods.wait_for_event("orphan", "DELETED", timeout=30)


@pytest.mark.parametrize(
    ("exit_code", "reason", "message", "phase"),
    [
        (137, "OOMKilled", "Memory cgroup out of memory: Killed process 1 (python)", "Failed"),
        (143, "Error", "received SIGTERM, checkpoint saved", "Failed"),
        (0, "Completed", "", "Succeeded"),
    ],
    ids=["oom-137", "sigterm-143", "completed-0"],
)
def test_patched_terminated_status_sticks(
    core_v1: Any, namespace: str, exit_code: int, reason: str, message: str, phase: str
) -> None:
    core_v1.create_namespaced_pod(namespace, fake_pod("trainer", tolerations=[SPOT_TOLERATION]))
    wait_pod_running(core_v1, namespace, "trainer")
    # A DisruptionTarget written earlier (as the scheduler would) must survive the kubelet-style report.
    # (It needs a lastTransitionTime: the disruption controller resets DisruptionTarget conditions older
    # than 2 minutes on pods that were not deleted, and a missing time counts as very old.)
    marker = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "PreemptionByScheduler",
        "message": "test marker",
        "lastTransitionTime": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    core_v1.patch_namespaced_pod_status(
        "trainer",
        namespace,
        {"status": {"conditions": [marker]}},
        _content_type="application/strategic-merge-patch+json",
    )

    patch_pod_terminated(core_v1, namespace, "trainer", exit_code, reason, message)

    def reported() -> bool:
        pod = read_pod_or_none(core_v1, namespace, "trainer")
        if pod is None or pod.status.phase != phase:
            return False
        term = pod.status.container_statuses[0].state.terminated
        return (
            term is not None
            and pod.status.container_statuses[0].state.running is None
            and term.exit_code == exit_code
            and term.reason == reason
            and (term.message or "") == message
            and condition_reason(pod, "DisruptionTarget") == "PreemptionByScheduler"
            and pod_conditions(pod)["Ready"].status == "False"
        )

    wait_for(reported, timeout=10, desc="patched terminated status")
    # kwok reacts to every pod update; touch the pod and watch the status survive kwok's next look.
    core_v1.patch_namespaced_pod("trainer", namespace, {"metadata": {"labels": {"touched": "yes"}}})
    holds_for(reported, duration=3, desc=f"terminated status (exit {exit_code})")


def test_pvc_in_default_class_binds_and_its_pod_schedules(core_v1: Any, namespace: str) -> None:
    core_v1.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "ckpt"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
        },
    )
    pvc = wait_for(
        lambda: (
            (c := core_v1.read_namespaced_persistent_volume_claim("ckpt", namespace)).status.phase == "Bound"
            and c
        ),
        timeout=30,
        desc="PVC ckpt Bound",
    )
    assert pvc.spec.storage_class_name == "standard"
    pod = fake_pod("uses-pvc", volumes=[{"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}}])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "ckpt", "mountPath": "/ckpt"}]
    core_v1.create_namespaced_pod(namespace, pod)
    wait_pod_running(core_v1, namespace, "uses-pvc")

    core_v1.delete_namespaced_pod("uses-pvc", namespace)
    wait_pod_gone(core_v1, namespace, "uses-pvc")
    core_v1.delete_namespaced_persistent_volume_claim("ckpt", namespace)

    def pv_gone() -> bool:
        try:
            core_v1.read_persistent_volume(pvc.spec.volume_name)
        except client.exceptions.ApiException as exc:
            return exc.status == 404
        return False

    wait_for(pv_gone, timeout=60, desc=f"PV {pvc.spec.volume_name} deleted with its claim")


def test_a_finalizer_keeps_a_terminated_pod_until_its_owner_removes_it(
    core_v1: Any, namespace: str, kwok_node: Any
) -> None:
    """Another controller's finalizer is never emptied by the fake kubelet: the pod stays, Failed, until
    that controller (here: the test) removes it. Then it goes."""
    node = kwok_node(gpus=0)
    pod = fake_pod("held", **on_node(node))
    pod["metadata"]["finalizers"] = ["example.com/hold"]
    core_v1.create_namespaced_pod(namespace, pod)
    wait_pod_running(core_v1, namespace, "held")
    core_v1.delete_namespaced_pod("held", namespace)

    def failed() -> bool:
        p = read_pod_or_none(core_v1, namespace, "held")
        return p is not None and p.status.phase == "Failed"

    wait_for(failed, timeout=30, desc="held pod Failed")
    holds_for(lambda: read_pod_or_none(core_v1, namespace, "held") is not None, 3, desc="held pod stays")
    core_v1.patch_namespaced_pod("held", namespace, {"metadata": {"finalizers": None}})
    wait_pod_gone(core_v1, namespace, "held")


def test_a_batch_job_sees_its_deleted_pod_fail(
    core_v1: Any, namespace: str, kwok_node: Any, api_client: Any
) -> None:
    """The Job controller's batch.kubernetes.io/job-tracking finalizer stays until the Job controller has
    counted the pod: a deleted pod of a Job is counted failed, as on a real node."""
    node = kwok_node(gpus=0)
    batch = client.BatchV1Api(api_client)
    template = fake_pod("x", **on_node(node))
    batch.create_namespaced_job(
        namespace,
        {
            "metadata": {"name": "j"},
            "spec": {
                "backoffLimit": 0,
                "template": {"metadata": {"labels": {"app": "j"}}, "spec": template["spec"]},
            },
        },
    )

    def job_pod() -> Any:
        items = core_v1.list_namespaced_pod(namespace, label_selector="app=j").items
        running = [p for p in items if p.status.phase == "Running"]
        return running[0] if running else None

    first = wait_for(job_pod, timeout=60, desc="the Job's pod Running")
    assert "batch.kubernetes.io/job-tracking" in (first.metadata.finalizers or [])
    core_v1.delete_namespaced_pod(first.metadata.name, namespace)

    def counted() -> Any:
        st = batch.read_namespaced_job_status("j", namespace).status
        return st if (st.failed or 0) >= 1 else None

    st = wait_for(counted, timeout=60, desc="the Job counting its deleted pod failed")
    assert st.failed == 1
    wait_pod_gone(core_v1, namespace, first.metadata.name)
