"""kueue_preemption: a Kueue priority preemption of a FineTuneJob and its re-admission, timed on the real
control plane with the real Kueue v0.17.0 (kwok node: the trainer containers are not run).

Each round: a low-priority job runs on the 8-GPU quota; a high-priority job arrives; Kueue evicts the
low one; the operator deletes its pod gracefully, the job goes Queued, the quota is handed back and the
high job's pod is created; the high job succeeds, its Workload is Finished, and the low job's next
attempt is created. Every time is taken from watch events in this process (one clock):
- `evicted_to_stop_s`: Workload Evicted=True seen -> the low pod's graceful delete seen
- `evicted_to_queued_s`: Workload Evicted=True -> the job's phase Queued
- `gone_to_handback_s`: the low pod gone (kwok ends it at once; a real trainer first writes its final
  checkpoint, which e2e/trainer benches time) -> the low Workload's QuotaReserved=False
- `preemptor_created_to_pod_s`: the high job created -> its pod created
- `finished_to_readmitted_s`: the high pod Succeeded -> the low Workload admitted again
- `readmitted_to_pod_s`: re-admitted -> the low job's next-attempt pod created (on a real node, the
  trainer's first step follows after its start and checkpoint load)
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench import _cluster as c

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kubeutil import CLUSTER_SH, kueue_queue_objects, patch_pod_terminated

NS = "bench-kueue"
ROUNDS = 5
KQ = "kueue.x-k8s.io"


def _cond(obj: dict[str, Any], kind: str) -> bool:
    return any(
        x.get("type") == kind and x.get("status") == "True"
        for x in (obj.get("status") or {}).get("conditions") or []
    )


def run() -> dict[str, Any]:
    started_cluster = c.cluster_up()
    started_kueue = False
    if subprocess.run(["bash", str(CLUSTER_SH), "kueue", "status"], capture_output=True).returncode != 0:
        subprocess.run(["bash", str(CLUSTER_SH), "kueue", "up"], check=True, capture_output=True)
        started_kueue = True  # before the operator starts: it checks once whether Kueue is served
    try:
        with c.bench_namespace(NS, "bench-kq", nodes=1, gpus=8, pods=50, operator_workers=4) as b:
            try:
                return _rounds(b)
            finally:
                for kind, name in (("clusterqueue", "bench-cq"), ("resourceflavor", "bench-gpu")):
                    c.kubectl("delete", f"{kind}.{KQ}", name, "--ignore-not-found", "--wait=false")
                for wpc in ("bench-low", "bench-high"):
                    c.kubectl("delete", f"workloadpriorityclass.{KQ}", wpc, "--ignore-not-found")
    finally:
        if started_kueue:
            subprocess.run(["bash", str(CLUSTER_SH), "kueue", "down"], capture_output=True)
        if started_cluster:
            c.cluster_down()


def _rounds(b: c.Setup) -> dict[str, Any]:
    names = {"flavor": "bench-gpu", "cq": "bench-cq", "lq": "team", "low": "bench-low", "high": "bench-high"}
    toleration = {
        "key": "kubetune.io/bench",
        "operator": "Equal",
        "value": "bench-kq",
        "effect": "NoSchedule",
    }
    objs = kueue_queue_objects(names, NS, toleration)
    objs[0]["spec"]["nodeLabels"] = {"kubetune.io/bench": "bench-kq"}
    for obj in objs:
        c.kubectl("apply", "-f", "-", input=json.dumps(obj))
    seen: dict[str, float] = {}
    lock = threading.Condition()

    def mark(key: str) -> None:
        with lock:
            seen.setdefault(key, time.monotonic())
            lock.notify_all()

    def on_pod(etype: str, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        mark(f"pod/{name}/added")
        if obj["metadata"].get("deletionTimestamp"):
            mark(f"pod/{name}/deleting")
        if etype == "DELETED":
            mark(f"pod/{name}/gone")
        if (obj.get("status") or {}).get("phase") == "Succeeded":
            mark(f"pod/{name}/succeeded")

    # Per job: admitted{n} -> evicted{n} -> released{n} (QuotaReserved False) -> admitted{n+1} ...
    wl_state: dict[str, list[Any]] = {}

    def on_workload(etype: str, obj: dict[str, Any]) -> None:
        job = obj["metadata"]["ownerReferences"][0]["name"]
        state = wl_state.setdefault(job, [0, "wait"])
        n, where = state
        if where == "wait" and _cond(obj, "Admitted"):
            mark(f"wl/{job}/admitted{n}")
            state[1] = "admitted"
        elif where == "admitted" and _cond(obj, "Evicted"):
            mark(f"wl/{job}/evicted{n}")
            state[1] = "evicted"
        elif where == "evicted" and not _cond(obj, "QuotaReserved"):
            mark(f"wl/{job}/released{n}")
            state[:] = [n + 1, "wait"]

    def on_job(etype: str, obj: dict[str, Any]) -> None:
        st = obj.get("status") or {}
        mark(f"job/{obj['metadata']['name']}/{st.get('phase')}/a{st.get('attempt')}")

    for path, fn in (
        (f"/api/v1/namespaces/{NS}/pods", on_pod),
        (f"/apis/{KQ}/v1beta2/namespaces/{NS}/workloads", on_workload),
        (f"/apis/kubetune.io/v1alpha1/namespaces/{NS}/finetunejobs", on_job),
    ):
        threading.Thread(target=c.raw_watch, args=(path, fn, b.stop), daemon=True).start()

    def job(name: str, prio: str) -> dict[str, Any]:
        m = c.bench_job(name, "bench-kq")
        m["spec"]["resources"] = {"gpus": 8}
        m["spec"].pop("nodeSelector")
        m["spec"].pop("tolerations")
        m["metadata"]["labels"] = {f"{KQ}/queue-name": "team", f"{KQ}/priority-class": prio}
        return m

    def wait(key: str, timeout: float = 60) -> float:
        with lock:
            if not lock.wait_for(lambda: key in seen, timeout=timeout):
                state = c.kubectl("get", "ftj,workloads.kueue.x-k8s.io,pods", "-n", NS, "-o", "wide")
                raise TimeoutError(
                    f"kueue_preemption: no {key} within {timeout}s; seen {sorted(seen)}\n{state}"
                )
            return seen[key]

    c.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(job("low", "bench-low")))
    wait("pod/low-a1-0/added")
    out: dict[str, list[float]] = {k: [] for k in (
        "evicted_to_stop_s", "evicted_to_queued_s", "gone_to_handback_s",
        "preemptor_created_to_pod_s", "finished_to_readmitted_s", "readmitted_to_pod_s",
    )}  # fmt: skip
    for r in range(ROUNDS):
        low_pod, high = f"low-a{r + 1}-0", f"high{r}"
        time.sleep(1.0)  # the low pod is running (kwok) before the preemptor arrives
        t_create = time.monotonic()
        c.kubectl("apply", "-n", NS, "-f", "-", input=json.dumps(job(high, "bench-high")))
        t_ev = wait(f"wl/low/evicted{r}")
        out["evicted_to_stop_s"].append(wait(f"pod/{low_pod}/deleting") - t_ev)
        out["evicted_to_queued_s"].append(wait(f"job/low/Queued/a{r + 2}") - t_ev)
        out["gone_to_handback_s"].append(wait(f"wl/low/released{r}") - wait(f"pod/{low_pod}/gone"))
        out["preemptor_created_to_pod_s"].append(wait(f"pod/{high}-a1-0/added") - t_create)
        time.sleep(0.5)
        patch_pod_terminated(b.core, NS, f"{high}-a1-0", 0, "Completed")
        t_done = wait(f"pod/{high}-a1-0/succeeded")
        t_re = wait(f"wl/low/admitted{r + 1}")
        out["finished_to_readmitted_s"].append(t_re - t_done)
        out["readmitted_to_pod_s"].append(wait(f"pod/low-a{r + 2}-0/added") - t_re)
    st = b.custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", NS, "finetunejobs", "low")["status"]
    result: dict[str, Any] = {"rounds": ROUNDS}
    for key, values in out.items():
        result[f"{key}_p50"] = c.percentile(values, 0.5)
        result[f"{key}_max"] = max(values)
    result["low_preemptions_kueue"] = int((st.get("preemptionsByReason") or {}).get("KueuePreempted", 0))
    result["low_failures"] = int(st.get("failures") or 0)
    result["low_lost_steps"] = int(st.get("lostSteps") or 0)
    return result
