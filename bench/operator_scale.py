"""operator_scale: 1,000 FineTuneJobs created at once on kwok GPU nodes, run to Succeeded.

Reports seconds until every job has its pod, the operator's peak RSS (VmHWM), and the API requests
the operator's reconcilers made per job over the whole lifecycle (create -> Running -> Succeeded).
The jobs share one pre-bound checkpoint claim (`checkpoint.existingClaim`): the local cluster's
hostPath provisioner binds about two claims a second, which would measure it rather than the operator."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import _cluster as c

JOBS = 1000
NS = "bench-scale"


def run() -> dict[str, Any]:
    from kubernetes import client, config

    started_cluster = c.cluster_up()
    c.install_crd()
    api = config.new_client_from_config(config_file=str(c.KUBECONFIG), persist_config=False)
    api.configuration.connection_pool_maxsize = 16
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    c.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=300s")
    core.create_namespace({"metadata": {"name": NS}})
    nodes = c.kwok_gpu_nodes("bench-scale", 5, gpus=256, pods=256)
    for n in nodes:
        core.create_node(n)
    for obj in c.shared_claim(NS):
        c.kubectl("apply", "-f", "-", input=json.dumps(obj))
    logdir = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    op = c.Operator(NS, logdir / "operator.log", "--workers", "16")
    running: set[str] = set()
    created: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()

    def on_pod(etype: str, obj: dict[str, Any]) -> None:
        with lock:
            created.add(obj["metadata"]["name"])
            if (obj.get("status") or {}).get("phase") == "Running":
                running.add(obj["metadata"]["name"])

    def watch_pods() -> None:
        c.raw_watch(f"/api/v1/namespaces/{NS}/pods", on_pod, stop)

    threading.Thread(target=watch_pods, daemon=True).start()
    try:
        requests_before = op.metrics().get("kubetune_api_requests_total", 0.0)
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: custom.create_namespaced_custom_object(
                "kubetune.io", "v1alpha1", NS, "finetunejobs", c.bench_job(f"s{i:04d}", "bench-scale", "shared-ckpt")), range(JOBS)))  # fmt: skip
        created_s = time.monotonic() - t0
        c.wait_until(lambda: len(created) >= JOBS, 600, f"{JOBS} pods created", interval=0.25)
        to_pods = time.monotonic() - t0
        c.wait_until(lambda: len(running) >= JOBS, 600, f"{JOBS} pods Running", interval=0.25)
        # Finish every job as the kubelet would report it.
        done = json.dumps({"reason": "Completed", "step": 100, "totalSteps": 100, "checkpointStep": 100})

        def finish(i: int) -> None:
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            term = {
                "exitCode": 0,
                "reason": "Completed",
                "message": done,
                "startedAt": now,
                "finishedAt": now,
            }
            body = {"status": {"phase": "Succeeded", "containerStatuses": [
                {"name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": term}}]}}  # fmt: skip
            core.patch_namespaced_pod_status(
                f"s{i:04d}-a1-0", NS, body, _content_type="application/strategic-merge-patch+json"
            )

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(finish, range(JOBS)))

        def succeeded() -> bool:
            items = custom.list_namespaced_custom_object("kubetune.io", "v1alpha1", NS, "finetunejobs")[
                "items"
            ]
            return sum((j.get("status") or {}).get("phase") == "Succeeded" for j in items) >= JOBS

        c.wait_until(succeeded, 600, f"{JOBS} jobs Succeeded", interval=1.0)
        lifecycle_s = time.monotonic() - t0
        metrics = op.metrics()
        requests = metrics.get("kubetune_api_requests_total", 0.0) - requests_before
        return {
            "jobs": JOBS,
            "seconds_to_create_jobs": round(created_s, 2),
            "seconds_to_all_pods": round(to_pods, 2),
            "seconds_to_all_succeeded": round(lifecycle_s, 2),
            "peak_rss_mb": round(op.peak_rss_mb(), 1),
            "requests_per_job": round(requests / JOBS, 2),
            "reconcile_count": metrics.get("kubetune_reconcile_seconds_count"),
            "reconcile_mean_ms": round(
                1000
                * metrics.get("kubetune_reconcile_seconds_sum", 0)
                / max(1, metrics.get("kubetune_reconcile_seconds_count", 1)),
                2,
            ),
            "target_peak_rss_mb": 300,
            "checkpoint_storage": "one shared existingClaim",
        }
    finally:
        stop.set()
        op.stop()
        c.kubectl("delete", "namespace", NS, "--wait=false")
        for n in nodes:
            c.kubectl("delete", "node", n["metadata"]["name"], "--ignore-not-found")
        if started_cluster:
            c.cluster_down()
