"""TensorBoard served from the cluster, against the real control plane with the real operator process.

kwok nodes run no containers, so these tests check objects: the Service, which pod it selects (through
the real EndpointSlice controller, which publishes only Ready pods), the sidecar on the rank-0 pod, the
standalone pod, and the TensorBoardReady condition. The real-node e2e test fetches the board over HTTP.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeutil import NotYet, dedicated_toleration, patch_pod_terminated, read_pod_or_none, wait_for
from opkit import apply, job_manifest

pytestmark = pytest.mark.cluster

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
SERVING = "kubetune.io/tensorboard"


@pytest.fixture
def custom(api_client: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


def status(custom: client.CustomObjectsApi, ns: str, name: str = "ft") -> dict[str, Any]:
    job = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    return job.get("status") or {}


def board(st: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in st.get("conditions") or [] if c["type"] == "TensorBoardReady"), None)


def wait_board(
    custom, ns, reason: str, timeout: float = 30.0, name: str = "ft", phase: str | None = None
) -> dict[str, Any]:
    def check() -> Any:
        st = status(custom, ns, name)
        cond = board(st)
        if cond is not None and cond["reason"] == reason and phase in (None, st.get("phase")):
            return st
        return NotYet(json.dumps({"phase": st.get("phase"), "TensorBoardReady": cond}))

    return wait_for(check, timeout=timeout, desc=f"{ns}/{name}: TensorBoardReady reason {reason}")


def wait_running(core, ns: str, name: str, timeout: float = 30.0) -> client.V1Pod:
    def check() -> Any:
        pod = read_pod_or_none(core, ns, name)
        if pod is not None and pod.status.phase == "Running" and pod.metadata.deletion_timestamp is None:
            return pod
        return NotYet(pod.status.phase if pod else "absent")

    return wait_for(check, timeout=timeout, desc=f"pod {ns}/{name} Running")


def endpoints(api_client: Any, ns: str, service: str) -> Any:
    """Pod names the Service's EndpointSlices list as ready (what port-forward and clients reach)."""
    slices = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice(
        ns, label_selector=f"kubernetes.io/service-name={service}"
    )
    return sorted(
        e.target_ref.name
        for s in slices.items
        for e in s.endpoints or []
        if e.target_ref is not None and e.conditions is not None and e.conditions.ready
    )


def wait_endpoints(api_client: Any, ns: str, service: str, want: list[str]) -> None:
    wait_for(
        lambda: endpoints(api_client, ns, service) == want or NotYet(endpoints(api_client, ns, service)),
        timeout=30,
        desc=f"service {service} to serve from {want}",
    )


def gone(read: Any) -> bool:
    try:
        read()
    except ApiException as exc:
        return exc.status == 404
    return False


def report() -> str:
    return json.dumps({"reason": "Completed", "step": 100, "totalSteps": 100, "checkpointStep": 100})


def test_tensorboard_rwo_sidecar_then_standalone_then_off(
    kube, operator, custom, core_v1, api_client, namespace
):
    ns = namespace
    # The API server's Pod Security admission rejects any pod here that is not `restricted`.
    core_v1.patch_namespace(
        ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    apply(kube, ns, job_manifest("ft", tensorboard={"serve": True}))  # one worker: a ReadWriteOnce claim
    pod = wait_running(core_v1, ns, "ft-a1-0")

    svc = core_v1.read_namespaced_service("ft-tensorboard", ns)
    assert svc.spec.type == "ClusterIP" and svc.spec.selector == {
        "kubetune.io/job-name": "ft",
        SERVING: "true",
    }
    assert [(p.name, p.port, p.target_port) for p in svc.spec.ports] == [("http", 6006, 6006)]
    assert svc.metadata.owner_references[0].kind == "FineTuneJob"
    assert pod.metadata.labels[SERVING] == "true"
    (side,) = pod.spec.init_containers
    assert (side.name, side.restart_policy) == ("tensorboard", "Always")
    assert side.command[-6:] == [
        "tensorboard",
        "--logdir",
        "/checkpoints/tensorboard",
        "--bind_all",
        "--port",
        "6006",
    ]
    assert [m.read_only for m in side.volume_mounts if m.name == "checkpoints"] == [True]
    st = wait_board(custom, ns, "Serving")
    assert "ft-a1-0" in board(st)["message"] and "svc/ft-tensorboard 6006" in board(st)["message"]
    wait_endpoints(api_client, ns, "ft-tensorboard", ["ft-a1-0"])
    assert read_pod_or_none(core_v1, ns, "ft-tensorboard") is None  # it would pin the claim to a node

    # The job ends; its pod stops and releases the claim: the standalone pod serves from then on.
    patch_pod_terminated(core_v1, ns, "ft-a1-0", 0, "Completed", report())
    server = wait_running(core_v1, ns, "ft-tensorboard")
    assert status(custom, ns)["phase"] == "Succeeded"
    assert server.metadata.owner_references[0].kind == "FineTuneJob"
    assert server.metadata.labels[SERVING] == "true"
    claim = next(v.persistent_volume_claim for v in server.spec.volumes if v.name == "checkpoints")
    assert (claim.claim_name, claim.read_only) == ("ft-ckpt", True)
    assert server.spec.containers[0].security_context.read_only_root_filesystem is True
    wait_endpoints(api_client, ns, "ft-tensorboard", ["ft-tensorboard"])
    st = wait_board(custom, ns, "Serving")
    assert "pod ft-tensorboard" in board(st)["message"]

    # Deleting the serving pod recreates it.
    core_v1.delete_namespaced_pod("ft-tensorboard", ns, grace_period_seconds=0)
    uid = server.metadata.uid
    wait_for(
        lambda: (p := read_pod_or_none(core_v1, ns, "ft-tensorboard")) is not None and p.metadata.uid != uid,
        timeout=30,
        desc="the TensorBoard pod recreated",
    )
    wait_endpoints(api_client, ns, "ft-tensorboard", ["ft-tensorboard"])

    # serve: false removes the Service, the pod and the condition.
    kube.kubectl(
        "patch", "ftj", "ft", "-n", ns, "--type=merge", "-p", '{"spec":{"tensorboard":{"serve":false}}}'
    )
    wait_for(
        lambda: gone(lambda: core_v1.read_namespaced_service("ft-tensorboard", ns)),
        timeout=30,
        desc="Service deleted",
    )
    wait_for(lambda: read_pod_or_none(core_v1, ns, "ft-tensorboard") is None, timeout=30, desc="pod deleted")
    wait_for(lambda: board(status(custom, ns)) is None, timeout=30, desc="condition removed")
    assert status(custom, ns)["phase"] == "Succeeded"


def test_tensorboard_missing_existing_claim_then_rwx_standalone(
    kube, operator, custom, core_v1, api_client, namespace, claim_with_volume
):
    ns = namespace
    apply(kube, ns, job_manifest("ft", tensorboard={"serve": True}, checkpoint={"existingClaim": "shared"}))
    st = wait_board(custom, ns, "ClaimNotFound")
    cond = board(st)
    assert cond["status"] == "False"
    assert "'shared'" in cond["message"] and "spec.checkpoint.existingClaim" in cond["message"]
    assert "spec.tensorboard.serve to false" in cond["message"]
    assert [p.metadata.name for p in core_v1.list_namespaced_pod(ns).items] == []

    # The claim appears, ReadWriteMany: one standalone pod serves all along; the trainer has no sidecar.
    claim_with_volume(ns, "shared", ["ReadWriteMany"])
    server = wait_running(core_v1, ns, "ft-tensorboard")
    trainer = wait_running(core_v1, ns, "ft-a1-0")
    assert not trainer.spec.init_containers and SERVING not in trainer.metadata.labels
    claim = next(v.persistent_volume_claim for v in server.spec.volumes if v.name == "checkpoints")
    assert (claim.claim_name, claim.read_only) == ("shared", True)
    wait_board(custom, ns, "Serving")
    wait_endpoints(api_client, ns, "ft-tensorboard", ["ft-tensorboard"])
    assert status(custom, ns)["phase"] == "Running"


def test_tensorboard_server_that_cannot_start_is_reported(
    kube, start_operator, custom, core_v1, namespace, claim_with_volume, kwok_node
):
    """A ReadWriteMany claim whose volume only a tainted node can mount: the trainer (which tolerates the
    taint) trains there, the standalone server (which must not) cannot schedule. After the start timeout
    the pod is deleted and the condition says why; the job keeps running."""
    ns = namespace
    start_operator("--start-timeout-seconds", "3")
    node = kwok_node(gpus=8)
    claim_with_volume(ns, "pinned", ["ReadWriteMany"], node=node)
    apply(
        kube, ns,
        job_manifest(
            "ft", tensorboard={"serve": True}, checkpoint={"existingClaim": "pinned"},
            nodeSelector={"kubernetes.io/hostname": node}, tolerations=[dedicated_toleration(node)],
        ),
    )  # fmt: skip
    wait_running(core_v1, ns, "ft-a1-0")
    # The job trains on (phase Running) while the server is given up (and retried every 3 s).
    st = wait_board(custom, ns, "ServerNotStarting", timeout=40, phase="Running")
    cond = board(st)
    assert "'pinned'" in cond["message"] and "ft-tensorboard" in cond["message"]
    assert "Unschedulable" in cond["message"] and "spec.tensorboard.serve to false" in cond["message"]
    assert st["failures"] == 0 and st["preemptions"] == 0 and st["attempt"] == 1


def test_tensorboard_refused_by_a_quota_never_stops_training(
    kube, operator, custom, core_v1, namespace, claim_with_volume
):
    """A namespace quota with room for the trainer pod only: the API refuses the server, the condition
    quotes it, and the job trains on."""
    ns = namespace
    core_v1.create_namespaced_resource_quota(
        ns, {"metadata": {"name": "one-pod"}, "spec": {"hard": {"pods": "1"}}}
    )
    wait_for(
        lambda: (core_v1.read_namespaced_resource_quota("one-pod", ns).status.hard or {}).get("pods") == "1",
        timeout=30,
        desc="quota counted by the quota controller",
    )
    claim_with_volume(ns, "shared", ["ReadWriteMany"])
    apply(kube, ns, job_manifest("ft", tensorboard={"serve": True}, checkpoint={"existingClaim": "shared"}))
    st = wait_board(custom, ns, "CreateFailed", phase="Running")
    cond = board(st)
    assert "Pod ft-tensorboard" in cond["message"] and "exceeded quota" in cond["message"]
    assert "spec.tensorboard.serve to false" in cond["message"]
    assert [p.metadata.name for p in core_v1.list_namespaced_pod(ns).items] == ["ft-a1-0"]
