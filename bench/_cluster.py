"""Bench plumbing for the operator: the local control plane (hack/cluster.sh), the CRD, an operator
process, and kwok GPU nodes sized for the run. Measurements only; nothing here asserts."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.opkit import OperatorProcess

REPO = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("KUBETUNE_BIN_DIR") or Path.home() / ".cache" / "kubetune" / "bin" / "current")
# The same variables hack/cluster.sh reads, so a bench can run on its own cluster beside the shared one.
KUBECONFIG = Path(os.environ.get("KUBETUNE_CLUSTER_DIR") or REPO / ".cluster") / "kubeconfig"


def cluster_up() -> bool:
    """Start the local cluster unless it runs; True when this call started it."""
    if subprocess.run(["bash", "hack/cluster.sh", "status"], cwd=REPO, capture_output=True).returncode == 0:
        return False
    up = subprocess.run(["bash", "hack/cluster.sh", "up"], cwd=REPO, capture_output=True, text=True)
    if up.returncode != 0:
        raise RuntimeError(f"hack/cluster.sh up failed:\n{up.stderr[-3000:]}")
    return True


def cluster_down() -> None:
    subprocess.run(["bash", "hack/cluster.sh", "down"], cwd=REPO, check=True, capture_output=True)


def kubectl(*args: str, input: str | None = None) -> str:
    cmd = [str(BIN / "kubectl"), "--kubeconfig", str(KUBECONFIG), *args]
    return subprocess.run(cmd, input=input, capture_output=True, text=True, check=True).stdout


def install_crd() -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "charts/kubetune/crds"))
    kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "--timeout=60s")


def wait_until(pred: Callable[[], Any], timeout: float, desc: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {desc}")


def kwok_gpu_nodes(prefix: str, count: int, gpus: int, pods: int) -> list[dict[str, Any]]:
    res = {"cpu": "256", "memory": "2Ti", "pods": str(pods), "nvidia.com/gpu": str(gpus)}
    return [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": f"{prefix}-{i}",
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {
                    "kubernetes.io/hostname": f"{prefix}-{i}",
                    "type": "kwok",
                    "kubetune.io/bench": prefix,
                },
            },
            "spec": {"taints": [{"key": "kubetune.io/bench", "value": prefix, "effect": "NoSchedule"}]},
            "status": {"allocatable": res, "capacity": res},
        }
        for i in range(count)
    ]


def shared_claim(namespace: str, name: str = "shared-ckpt") -> list[dict[str, Any]]:
    """A pre-bound PV + RWX claim for jobs that use `checkpoint.existingClaim` (kwok mounts nothing)."""
    pv = f"{namespace}-{name}"
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Ti"},
                "accessModes": ["ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/kubetune-bench/{pv}"},
                "claimRef": {"namespace": namespace, "name": name},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Ti"}},
            },
        },
    ]


def bench_job(name: str, node_prefix: str, existing_claim: str | None = None) -> dict[str, Any]:
    checkpoint = {"existingClaim": existing_claim} if existing_claim else {}
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "test_resnet", "numClasses": 10},
            "data": {"format": "synthetic"},
            "training": {"maxSteps": 100},
            "checkpoint": checkpoint,
            "metrics": {"port": 0},
            "resources": {"gpus": 1},
            "nodeSelector": {"kubetune.io/bench": node_prefix},
            "tolerations": [
                {
                    "key": "kubetune.io/bench",
                    "operator": "Equal",
                    "value": node_prefix,
                    "effect": "NoSchedule",
                }
            ],
        },
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


def raw_watch(path: str, on_event: Callable[[str, dict[str, Any]], None], stop: Any) -> None:
    """Stream watch events of `path` (e.g. /api/v1/namespaces/x/pods) as plain dicts until `stop` is set.

    The typed client deserialises every event into model classes, which is too slow to timestamp
    hundreds of events; this reads the JSON lines directly, reconnecting when the stream ends."""
    import http.client
    import json
    import ssl

    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(KUBECONFIG), client_configuration=cfg, persist_config=False)
    ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
    ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    host = cfg.host.split("://", 1)[1]
    while not stop.is_set():
        conn = http.client.HTTPSConnection(host, context=ctx, timeout=30)
        try:
            conn.request("GET", f"{path}?watch=1&timeoutSeconds=25&allowWatchBookmarks=false")
            resp = conn.getresponse()
            while not stop.is_set():
                line = resp.readline()
                if not line:
                    break
                ev = json.loads(line)
                if ev.get("type") == "ERROR":  # e.g. 410 Gone: reconnect and re-list
                    break
                on_event(ev["type"], ev["object"])
        except (OSError, ValueError, http.client.HTTPException):
            time.sleep(0.2)
        finally:
            conn.close()


class Setup:
    """What a bench gets from `bench_namespace`: API clients, the operator, and a pod watch."""

    def __init__(self, api: Any, op: OperatorProcess, namespace: str) -> None:
        from kubernetes import client

        self.api, self.op, self.namespace = api, op, namespace
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.stop = threading.Event()

    def watch_pods(self, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        path = f"/api/v1/namespaces/{self.namespace}/pods"
        threading.Thread(target=raw_watch, args=(path, on_event, self.stop), daemon=True).start()


@contextmanager
def bench_namespace(
    namespace: str, node_prefix: str, nodes: int, gpus: int, pods: int, operator_workers: int
) -> Iterator[Setup]:
    """A fresh namespace, `nodes` kwok GPU nodes only its jobs tolerate, and one operator for it; all
    removed afterwards (and the cluster stopped when this call started it)."""
    from kubernetes import config

    started_cluster = cluster_up()
    install_crd()
    api = config.new_client_from_config(config_file=str(KUBECONFIG), persist_config=False)
    api.configuration.connection_pool_maxsize = 16
    kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=true", "--timeout=300s")
    kubectl("create", "namespace", namespace)
    node_objs = kwok_gpu_nodes(node_prefix, nodes, gpus=gpus, pods=pods)
    for node in node_objs:
        kubectl("apply", "-f", "-", input=json.dumps(node))
    logdir = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    op = OperatorProcess(
        KUBECONFIG, namespace, logdir / "operator.log", "--workers", str(operator_workers),
        fast=False, trainer_image="registry.invalid/kubetune/trainer:bench",
    ).start()  # fmt: skip
    setup = Setup(api, op, namespace)
    try:
        yield setup
    finally:
        setup.stop.set()
        op.stop()
        kubectl("delete", "namespace", namespace, "--wait=false")
        for node in node_objs:
            kubectl("delete", "node", node["metadata"]["name"], "--ignore-not-found")
        if started_cluster:
            cluster_down()
