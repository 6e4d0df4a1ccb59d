"""operator_scale: 1,000 FineTuneJobs created at once on kwok GPU nodes, run to Succeeded.

Reports seconds until every job has its pod, the operator's peak RSS (VmHWM), and the API requests
the operator's reconcilers made per job over the whole lifecycle (create -> Running -> Succeeded).
The jobs share one pre-bound checkpoint claim (`checkpoint.existingClaim`): the local cluster's
hostPath provisioner binds about two claims a second, which would measure it rather than the operator."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import _cluster as c

JOBS = 1000
NS = "bench-scale"
DONE = json.dumps({"reason": "Completed", "step": 100, "totalSteps": 100, "checkpointStep": 100})


def _succeeded_body() -> dict[str, Any]:
    """The status a kubelet reports for a trainer that exited 0 (kwok never ends pods itself)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    term = {"exitCode": 0, "reason": "Completed", "message": DONE, "startedAt": now, "finishedAt": now}
    status = {"name": "trainer", "image": "x", "imageID": "", "ready": False, "restartCount": 0, "state": {"terminated": term}}  # fmt: skip
    return {"status": {"phase": "Succeeded", "containerStatuses": [status]}}


def run() -> dict[str, Any]:
    with c.bench_namespace(NS, "bench-scale", nodes=5, gpus=256, pods=256, operator_workers=16) as b:
        for obj in c.shared_claim(NS):
            c.kubectl("apply", "-f", "-", input=json.dumps(obj))
        running: set[str] = set()
        created: set[str] = set()
        lock = threading.Lock()

        def on_pod(etype: str, obj: dict[str, Any]) -> None:
            with lock:
                created.add(obj["metadata"]["name"])
                if (obj.get("status") or {}).get("phase") == "Running":
                    running.add(obj["metadata"]["name"])

        b.watch_pods(on_pod)
        requests_before = b.op.samples().get("kubetune_api_requests_total", 0.0)
        t0 = time.monotonic()

        def create(i: int) -> None:
            job = c.bench_job(f"s{i:04d}", "bench-scale", "shared-ckpt")
            b.custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", NS, "finetunejobs", job)

        def finish(i: int) -> None:
            b.core.patch_namespaced_pod_status(
                f"s{i:04d}-a1-0",
                NS,
                _succeeded_body(),
                _content_type="application/strategic-merge-patch+json",
            )

        def succeeded() -> bool:
            items = b.custom.list_namespaced_custom_object("kubetune.io", "v1alpha1", NS, "finetunejobs")[
                "items"
            ]
            return sum((j.get("status") or {}).get("phase") == "Succeeded" for j in items) >= JOBS

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, range(JOBS)))
        created_s = time.monotonic() - t0
        c.wait_until(lambda: len(created) >= JOBS, 600, f"{JOBS} pods created", interval=0.25)
        to_pods = time.monotonic() - t0
        c.wait_until(lambda: len(running) >= JOBS, 600, f"{JOBS} pods Running", interval=0.25)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(finish, range(JOBS)))
        c.wait_until(succeeded, 600, f"{JOBS} jobs Succeeded", interval=1.0)
        lifecycle_s = time.monotonic() - t0
        metrics = b.op.samples()
        rss = b.op.peak_rss_mb()
    requests = metrics.get("kubetune_api_requests_total", 0.0) - requests_before
    reconciles = metrics.get("kubetune_reconcile_seconds_count", 0.0)
    return {
        "jobs": JOBS,
        "seconds_to_create_jobs": round(created_s, 2),
        "seconds_to_all_pods": round(to_pods, 2),
        "seconds_to_all_succeeded": round(lifecycle_s, 2),
        "peak_rss_mb": round(rss, 1),
        "requests_per_job": round(requests / JOBS, 2),
        "reconcile_count": reconciles,
        "reconcile_mean_ms": round(
            1000 * metrics.get("kubetune_reconcile_seconds_sum", 0) / max(1.0, reconciles), 2
        ),
        "target_peak_rss_mb": 300,
        "checkpoint_storage": "one shared existingClaim",
    }
