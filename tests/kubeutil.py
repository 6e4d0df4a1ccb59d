"""Helpers for tests that talk to a real Kubernetes API (the local kwok cluster or one named by
KUBETUNE_TEST_KUBECONFIG): polling with deadlines, pod conditions, recording pod watch events, and
playing the kubelet's part on kwok nodes (reporting how a container ended).

Nothing here mocks the API; every helper reads or writes real objects.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
CLUSTER_SH = REPO / "hack" / "cluster.sh"
# Our pinned binaries (hack/build-binaries.sh); never the system's kubectl.
BIN_DIR = Path(
    os.environ.get("KUBETUNE_BIN_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune" / "bin" / "current"
)

STRATEGIC_MERGE = "application/strategic-merge-patch+json"

# Fake-node facts the cluster tests rely on (hack/k8s/nodes.yaml).
SPOT_TOLERATION = {
    "key": "cloud.google.com/gke-spot",
    "operator": "Equal",
    "value": "true",
    "effect": "NoSchedule",
}
GPU = "nvidia.com/gpu"


class NotYet:
    """A falsy predicate result that says what was seen instead, for ``wait_for``'s timeout message."""

    def __init__(self, observed: object) -> None:
        self.observed = observed

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return str(self.observed)


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline; the message carries the last observed value."""


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    desc: str = "condition",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    Exceptions listed in ``ignore`` count as "not yet" (e.g. ``ApiException`` while an object does not
    exist). On timeout raises ``WaitTimeout`` naming ``desc`` and the last value or exception observed.
    """
    deadline = time.monotonic() + timeout
    last: object = "<never evaluated>"
    while True:
        try:
            value = predicate()
        except ignore as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {desc}; last observed: {last!r}")
        time.sleep(interval)


def _get(obj: Any, snake: str, camel: str | None = None) -> Any:
    """Read a field from either a client model or a plain dict (as a watch or patch may return)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(camel or snake, obj.get(snake))
    return getattr(obj, snake, None)


def pod_conditions(pod: Any) -> dict[str, Any]:
    """Map condition type -> condition (model or dict) for a pod model or pod dict."""
    status = _get(pod, "status")
    return {_get(c, "type"): c for c in (_get(status, "conditions") or [])}


def condition_true(pod: Any, ctype: str) -> bool:
    cond = pod_conditions(pod).get(ctype)
    return cond is not None and _get(cond, "status") == "True"


def condition_reason(pod: Any, ctype: str) -> str | None:
    """The reason of condition ``ctype`` when its status is "True", else None."""
    cond = pod_conditions(pod).get(ctype)
    if cond is None or _get(cond, "status") != "True":
        return None
    return _get(cond, "reason")


def pod_phase(pod: Any) -> str | None:
    return _get(_get(pod, "status"), "phase")


def read_pod_or_none(core_v1: client.CoreV1Api, ns: str, name: str) -> client.V1Pod | None:
    try:
        return core_v1.read_namespaced_pod(name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def wait_pod_gone(core_v1: client.CoreV1Api, ns: str, name: str, timeout: float = 30.0) -> None:
    wait_for(
        lambda: read_pod_or_none(core_v1, ns, name) is None,
        timeout=timeout,
        desc=f"pod {ns}/{name} to be deleted",
    )


def wait_pod_running(core_v1: client.CoreV1Api, ns: str, name: str, timeout: float = 30.0) -> client.V1Pod:
    """Wait until the pod is bound and kwok reports it Running and Ready; return it."""

    def running() -> client.V1Pod | NotYet:
        pod = read_pod_or_none(core_v1, ns, name)
        if pod is None:
            return NotYet("no such pod")
        if pod_phase(pod) == "Running" and condition_true(pod, "Ready"):
            return pod
        return NotYet(
            f"phase={pod_phase(pod)} node={pod.spec.node_name} conditions={sorted(pod_conditions(pod))}"
        )

    pod = wait_for(running, timeout=timeout, desc=f"pod {ns}/{name} Running and Ready")
    assert isinstance(pod, client.V1Pod)
    return pod


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def patch_pod_terminated(
    core_v1: client.CoreV1Api,
    ns: str,
    name: str,
    exit_code: int,
    reason: str,
    message: str = "",
    container: str | None = None,
) -> client.V1Pod:
    """Report that the pod's container ended, as the kubelet would for a ``restartPolicy: Never`` pod.

    Sets phase Succeeded (exit 0) or Failed, the container's ``state.terminated`` (exit code, reason,
    message, start/finish times) with ``running`` cleared, ``ready: false``, and Ready/ContainersReady
    False. Other containers in the pod are reported terminated too (143/Error on failure, 0/Completed on
    success). Every other condition, DisruptionTarget included, is left untouched (strategic merge by
    condition type). kwok's pod-ready stage skips terminal pods, so this status sticks.
    """
    pod = core_v1.read_namespaced_pod(name, ns)
    target = container or pod.spec.containers[0].name
    now = _now()
    succeeded = exit_code == 0
    phase = "Succeeded" if succeeded else "Failed"
    started = {
        cs.name: cs.state.running.started_at
        for cs in (pod.status.container_statuses or [])
        if cs.state is not None and cs.state.running is not None and cs.state.running.started_at
    }
    statuses = []
    for c in pod.spec.containers:
        if c.name == target:
            code, why, msg = exit_code, reason, message
        else:
            code, why, msg = (0, "Completed", "") if succeeded else (143, "Error", "")
        started_at = started.get(c.name)
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": why,
            "startedAt": started_at.strftime("%Y-%m-%dT%H:%M:%SZ") if started_at else now,
            "finishedAt": now,
        }
        if msg:
            terminated["message"] = msg
        statuses.append(
            {
                "name": c.name,
                "image": c.image,
                "ready": False,
                "started": False,
                "restartCount": 0,
                "state": {"running": None, "waiting": None, "terminated": terminated},
            }
        )
    cond_reason = "PodCompleted" if succeeded else "PodFailed"
    body = {
        "status": {
            "phase": phase,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": cond_reason, "lastTransitionTime": now},
                {
                    "type": "ContainersReady",
                    "status": "False",
                    "reason": cond_reason,
                    "lastTransitionTime": now,
                },
            ],
            "containerStatuses": statuses,
        }
    }
    return core_v1.patch_namespaced_pod_status(name, ns, body, _content_type=STRATEGIC_MERGE)


class PodRecorder:
    """Every pod object a watch delivered, in order; lets a test see transient states (such as the
    DisruptionTarget condition written just before a pod is deleted) that a poll could miss."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self.error: BaseException | None = None

    def _add(self, etype: str, obj: dict[str, Any]) -> None:
        with self._cond:
            self.events.append((etype, obj))
            self._cond.notify_all()

    def seen(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        """(event type, pod dict) for every event about pod ``name`` so far."""
        with self._cond:
            return [(t, o) for t, o in self.events if o.get("metadata", {}).get("name") == name]

    def wait_for_condition(self, name: str, ctype: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until some observed version of pod ``name`` had condition ``ctype`` True; return it."""

        def found() -> dict[str, Any] | None:
            for _, obj in self.seen(name):
                cond = pod_conditions(obj).get(ctype)
                if cond is not None and cond.get("status") == "True":
                    return cond
            return None

        def last() -> str:
            evs = self.seen(name)
            if self.error is not None:
                return f"watch failed: {self.error!r}"
            if not evs:
                return "no events"
            etype, obj = evs[-1]
            return f"{etype} phase={pod_phase(obj)} conditions={sorted(pod_conditions(obj))}"

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if (cond := found()) is not None:
                    return cond
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.error is not None:
                    raise WaitTimeout(
                        f"timed out after {timeout:g}s waiting for pod {name} to have condition {ctype}; "
                        f"last observed: {last()}"
                    )
                self._cond.wait(min(remaining, 1.0))

    def wait_for_event(self, name: str, etype: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for a watch event of type ``etype`` (ADDED/MODIFIED/DELETED) about pod ``name``."""
        return wait_for(
            lambda: next((o for t, o in self.seen(name) if t == etype), None),
            timeout=timeout,
            interval=0.1,
            desc=f"{etype} event for pod {name} (seen: {[t for t, _ in self.seen(name)]})",
        )


@contextmanager
def record_pods(core_v1: client.CoreV1Api, ns: str, timeout_seconds: int = 300) -> Iterator[PodRecorder]:
    """Watch pods in ``ns`` in a background thread for the duration of the ``with`` block.

    The watch starts from the namespace's current resourceVersion, so nothing created inside the
    block is missed. Objects are recorded as plain dicts (camelCase, as the API sends them).
    """
    recorder = PodRecorder()
    rv = core_v1.list_namespaced_pod(ns).metadata.resource_version
    w = watch.Watch()
    started = threading.Event()

    def run() -> None:
        try:
            started.set()
            for ev in w.stream(
                core_v1.list_namespaced_pod,
                ns,
                resource_version=rv,
                timeout_seconds=timeout_seconds,
            ):
                recorder._add(ev["type"], ev["raw_object"])
        except BaseException as exc:
            recorder.error = exc
            with recorder._cond:
                recorder._cond.notify_all()

    t = threading.Thread(target=run, name=f"watch-pods-{ns}", daemon=True)
    t.start()
    started.wait(5)
    try:
        yield recorder
    finally:
        w.stop()


def holds_for(
    predicate: Callable[[], object], duration: float, interval: float = 0.2, desc: str = "condition"
) -> None:
    """Assert ``predicate`` stays truthy for the whole window (e.g. a patched status is not overwritten).
    Fails at the first falsy observation, with that value."""
    deadline = time.monotonic() + duration
    while True:
        value = predicate()
        if not value:
            raise AssertionError(f"{desc} stopped holding; observed: {value!r}")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def fake_pod(name: str, **spec: Any) -> dict[str, Any]:
    """A minimal one-container pod for kwok nodes (the image is never pulled). ``spec`` fields are
    merged into the pod spec (camelCase, as in a manifest); ``gpus`` sets nvidia.com/gpu limits."""
    gpus = spec.pop("gpus", 0)
    resources: dict[str, Any] = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    if gpus:
        resources["limits"] = {GPU: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {"name": "main", "image": "registry.invalid/kubetune/fake:0", "resources": resources}
            ],
            **spec,
        },
    }


def create_kwok_node(
    core_v1: client.CoreV1Api,
    name: str,
    gpus: int = 8,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    timeout: float = 30.0,
) -> client.V1Node:
    """Create a kwok-managed fake node (32 CPU, 256Gi, ``gpus`` GPUs) and wait until it is Ready and
    the node lifecycle controller has lifted its not-ready taint, i.e. pods can be scheduled to it.
    By default it carries a NoSchedule taint ``kubetune.io/dedicated=<name>``, so only pods that
    tolerate it (see ``dedicated_toleration``) land there and tests do not disturb each other."""
    res = {"cpu": "32", "memory": "256Gi", "pods": "110"}
    if gpus:
        res[GPU] = str(gpus)
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "kubetune.io/node-kind": "kwok",
                "kubetune.io/test-node": "true",
                **(labels or {}),
            },
        },
        "spec": {"taints": taints if taints is not None else [dedicated_taint(name)]},
        "status": {"allocatable": res, "capacity": res},
    }
    core_v1.create_node(node)

    def schedulable() -> client.V1Node | NotYet:
        n = core_v1.read_node(name)
        ready = any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
        tainted = [t.key for t in (n.spec.taints or []) if t.key.startswith("node.kubernetes.io/")]
        return n if ready and not tainted else NotYet(f"ready={ready} taints={tainted}")

    result = wait_for(schedulable, timeout=timeout, desc=f"kwok node {name} Ready and untainted")
    assert isinstance(result, client.V1Node)
    return result


def dedicated_taint(node: str) -> dict[str, str]:
    return {"key": "kubetune.io/dedicated", "value": node, "effect": "NoSchedule"}


def dedicated_toleration(node: str) -> dict[str, str]:
    return {"key": "kubetune.io/dedicated", "operator": "Equal", "value": node, "effect": "NoSchedule"}


def delete_node_if_exists(core_v1: client.CoreV1Api, name: str) -> None:
    try:
        core_v1.delete_node(name)
    except ApiException as exc:
        if exc.status != 404:
            raise


def process_alive(pid: int) -> bool:
    """True when ``pid`` is a live process (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


KQ = "kueue.x-k8s.io"


def kueue_queue_objects(
    names: dict[str, str], namespace: str, toleration: dict[str, str]
) -> list[dict[str, Any]]:
    """A Kueue setup for one namespace: a ResourceFlavor leading to the node labelled
    kubetune.io/pool=<namespace> (and tolerating it), a ClusterQueue with 8 nvidia.com/gpu scoped to the
    namespace with priority preemption inside it, a LocalQueue, and two WorkloadPriorityClasses (100 and
    1000). `names`: flavor, cq, lq, low, high."""
    return [
        {
            "apiVersion": f"{KQ}/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": names["flavor"]},
            "spec": {
                "nodeLabels": {"kubetune.io/pool": namespace},
                "tolerations": [toleration],
            },
        },
        {
            "apiVersion": f"{KQ}/v1beta2",
            "kind": "ClusterQueue",
            "metadata": {"name": names["cq"]},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                        "flavors": [
                            {
                                "name": names["flavor"],
                                "resources": [
                                    {"name": "cpu", "nominalQuota": "64"},
                                    {"name": "memory", "nominalQuota": "256Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": 8},
                                ],
                            }
                        ],
                    }
                ],
            },
        },
        {
            "apiVersion": f"{KQ}/v1beta2",
            "kind": "LocalQueue",
            "metadata": {"name": names["lq"], "namespace": namespace},
            "spec": {"clusterQueue": names["cq"]},
        },
        {"apiVersion": f"{KQ}/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": names["low"]}, "value": 100},
        {"apiVersion": f"{KQ}/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": names["high"]}, "value": 1000},
    ]  # fmt: skip
