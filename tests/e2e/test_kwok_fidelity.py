"""kwok stands for the kubelet in every cluster test, so it must end pods as the kubelet does. This runs the
same pod on the real node (kubelet + containerd) and on a kwok node, disrupts both the same way, and
compares what the API shows while another controller's finalizer holds the pod: phase, exit code, the
DisruptionTarget condition and Ready. The real node is the reference (hack/k8s/kwok-stages.yaml is the fake).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from . import scenario as sc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FINALIZER = "kubetune.io/e2e-hold"
KWOK_NODE = "kwok-cpu-0"
# Exits 143 on SIGTERM, as the trainer does; the kwok stage reports the same code for a pod it terminates.
SIGTERM_143 = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
    "print('ready', flush=True)\n"
    "while True: time.sleep(1)\n"
)


def _pod(name: str, node: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "finalizers": [FINALIZER], "labels": {"kubetune.io/e2e": "fidelity"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 20,
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "main",
                    "image": sc.image_ref("operator"),
                    "command": ["python", "-c", SIGTERM_143],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                }
            ],
        },
    }


def _wait(what: str, check: Any, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _read(core: client.CoreV1Api, ns: str, name: str) -> client.V1Pod | None:
    try:
        return core.read_namespaced_pod(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _ended(pod: client.V1Pod) -> dict[str, Any]:
    """What a controller reading this pod learns about how it ended."""
    conds = {c.type: c for c in pod.status.conditions or []}
    term = None
    for cs in pod.status.container_statuses or []:
        if cs.state and cs.state.terminated:
            term = cs.state.terminated
    disruption = conds.get("DisruptionTarget")
    return {
        "phase": pod.status.phase,
        "exitCode": term.exit_code if term else None,
        "ready": conds["Ready"].status if "Ready" in conds else None,
        "disruptionTarget": (disruption.status, disruption.reason) if disruption else None,
        "marked": pod.metadata.deletion_timestamp is not None,
    }


def _terminal(core: client.CoreV1Api, ns: str, name: str) -> dict[str, Any] | None:
    pod = _read(core, ns, name)
    assert pod is not None, f"{name} was removed although its finalizer should hold it"
    got = _ended(pod)
    return got if got["phase"] in ("Failed", "Succeeded") else None


def _disrupt(core: client.CoreV1Api, ns: str, name: str, how: str) -> None:
    if how == "eviction":
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace=ns))
        core.create_namespaced_pod_eviction(name, ns, body)
    else:
        core.delete_namespaced_pod(name, ns)


def _release(core: client.CoreV1Api, ns: str, name: str) -> None:
    core.patch_namespaced_pod(name, ns, {"metadata": {"finalizers": None}})


@pytest.mark.timeout(600)
@pytest.mark.parametrize("how", ["eviction", "delete"])
def test_kwok_ends_a_pod_as_the_kubelet_does(env: sc.Env, how: str) -> None:
    core, ns = env.core, env.namespace
    names = {"real": f"fidelity-{how}-real", "kwok": f"fidelity-{how}-kwok"}
    nodes = {"real": sc.REAL_NODE, "kwok": KWOK_NODE}
    for side, name in names.items():
        if _read(core, ns, name) is not None:  # a kept cluster from an earlier run
            _release(core, ns, name)
            _wait(f"{name} gone", lambda n=name: _read(core, ns, n) is None)
        core.create_namespaced_pod(ns, _pod(name, nodes[side]))
    ended: dict[str, dict[str, Any]] = {}
    try:
        for side, name in names.items():
            _wait(
                f"{name} Ready on {nodes[side]}",
                lambda n=name: (p := _read(core, ns, n)) is not None and _ended(p)["ready"] == "True",
            )
            if side == "real":  # the handler is installed before 'ready' is printed
                _wait(f"{name} printed ready", lambda n=name: "ready" in core.read_namespaced_pod_log(n, ns))
        for name in names.values():
            _disrupt(core, ns, name, how)
        for side, name in names.items():
            ended[side] = _wait(
                f"{name} terminal while its finalizer holds it",
                lambda n=name: _terminal(core, ns, n),
                timeout=90,
            )
        # Still there: the finalizer holds both, and neither side removed it.
        for name in names.values():
            pod = _read(core, ns, name)
            assert pod is not None and FINALIZER in (pod.metadata.finalizers or []), name
    finally:
        for name in names.values():
            if _read(core, ns, name) is not None:
                _release(core, ns, name)
    print(f"{how}: {ended}")
    assert ended["real"]["phase"] == "Failed" and ended["real"]["exitCode"] == 143, ended
    assert ended["kwok"] == ended["real"], f"kwok differs from the kubelet after {how}: {ended}"
    # Once the finalizer is gone, both pods are removed (kwok's pod-delete stage, the kubelet's cleanup).
    for name in names.values():
        _wait(
            f"{name} removed after its finalizer went", lambda n=name: _read(core, ns, n) is None, timeout=60
        )
