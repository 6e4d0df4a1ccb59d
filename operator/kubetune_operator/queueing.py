"""The lifecycle's Kueue step: a labelled job runs only while its Workload is admitted (pure).

- No Workload yet: the plan creates it; the job is `Queued` and creates no pods.
- Admitted (and not evicted): the job goes on as any other; its pods get the admitted flavors'
  node labels and tolerations, and the wait is reported (`kubetune_queued_seconds`). The Workload's
  PodsReady condition follows the attempt's pods, so Kueue's `waitForPodsReady` timeouts work.
- Evicted (priority preemption, fair sharing, a stopped ClusterQueue, a pods-ready timeout) or the
  Workload gone while pods run: the running attempt is stopped the way `runPolicy.suspend` stops it
  (graceful delete: SIGTERM, final checkpoint, exit 143), counted once in `preemptionsByReason` under
  `KueuePreempted` or `KueueEvicted`, never as a failure; the next attempt is due as soon as Kueue
  admits the job again. Once no pod of the stopped attempt runs, the admission is cleared so Kueue can
  hand the quota on (as Kueue's own job reconciler does).
- Suspended (`runPolicy.suspend`): the Workload is deactivated (`spec.active: false`, how Kueue's own
  integrations stop a workload on purpose): Kueue evicts it, and once the pods have checkpointed and
  stopped the quota is handed back. Nothing is counted. Unsuspended, it is activated and queues again.
- A finished job marks its Workload Finished, which releases the quota at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from kubetune_operator import kueue
from kubetune_operator.counting import record_preemption
from kubetune_operator.judging import current_pods
from kubetune_operator.plan_types import Draft, Event, Observed, mark
from kubetune_operator.pods import ENDED, PodEnd
from kubetune_operator.status import fmt_time, parse_time
from kubetune_operator.teardown import live_before


def _reason(text: str, fallback: str) -> str:
    """A condition reason (CamelCase, no spaces) from Kueue's."""
    cleaned = re.sub(r"[^A-Za-z0-9_]", "", text)
    return cleaned if cleaned[:1].isalpha() else fallback


def hold(obs: Observed, ends: Mapping[str, PodEnd], d: Draft) -> bool:
    """True while the job must wait for Kueue (the plan then creates no pods)."""
    q = obs.queue
    if q is None:
        return False
    st, now = d.status, obs.now
    wl = q.workload
    info: dict[str, object] = {"localQueue": q.local_queue, "workload": kueue.workload_name(obs.job)}
    if wl is not None and wl.cluster_queue:
        info["clusterQueue"] = wl.cluster_queue
    if wl is not None and wl.flavors:
        info["flavors"] = list(wl.flavors)
    prev = st.get("kueue") or {}
    if wl is not None and wl.admitted and wl.evicted is None:
        where = kueue.placement(q)
        if where.error is not None and st.get("nextAttemptTime"):  # not started: do not start it
            st["kueue"] = {**info, "admitted": True}
            mark(d, obs, "Queued", "PodSetUpdateConflict", f"admitted, but cannot start: {where.error}")
            return True
        d.placement = where
        since = parse_time(prev.get("queuedSince"))
        if since is not None:
            d.queued_seconds = max(0.0, (now - since).total_seconds())
        st["kueue"] = {**info, "admitted": True}
        d.workload_patch = kueue.pods_ready_patch(wl, _all_ready(obs, d), now)
        return False

    st["kueue"] = {**info, "admitted": False, "queuedSince": prev.get("queuedSince") or fmt_time(now)}
    if wl is not None and not wl.active:
        d.workload_active = True  # unsuspended: queue again
    if q.error:
        mark(d, obs, "Queued", "QueueConfigError", f"cannot queue in LocalQueue {q.local_queue}: {q.error}")
        return True
    if wl is None:
        d.workload_create = kueue.build_workload(obs.job, q)
    _stop_running_attempt(obs, ends, d)
    if d.status.get("phase") == "Failed":
        return True  # runPolicy.maxPreemptions was exceeded
    attempt = int(st["attempt"])
    if (
        wl is not None
        and wl.evicted is not None
        and wl.quota_reserved
        and not live_before(obs, ends, attempt)
    ):
        d.workload_patch = kueue.unadmit_patch(wl, now)
    if wl is None:
        reason = "WorkloadCreated"
        msg = f"waiting for Kueue: Workload {info['workload']} in LocalQueue {q.local_queue}"
    elif wl.evicted is not None:
        ev = wl.evicted
        reason = kueue.eviction_reason(ev)
        stopping = live_before(obs, ends, attempt)
        then = f"waiting for {len(stopping)} pod(s) to checkpoint and stop, then " if stopping else ""
        msg = f"evicted by Kueue ({ev.reason}: {ev.message}); {then}waiting in LocalQueue {q.local_queue}"
    else:
        w = wl.waiting
        reason = _reason(w.reason, "Pending")
        msg = f"waiting in LocalQueue {q.local_queue} ({w.reason}): {w.message}"
    mark(d, obs, "Queued", reason, msg)
    return True


def _all_ready(obs: Observed, d: Draft) -> bool:
    """Every rank of the running attempt is Ready or has Succeeded (what Kueue's PodsReady means)."""
    if d.status.get("nextAttemptTime"):
        return False  # between attempts: nothing runs
    pods = current_pods(obs, int(d.status["attempt"]))
    return all(
        not p.gone and (p.phase == "Succeeded" or (p.ready and p.deleting_since is None)) for p in pods
    )


def _stop_running_attempt(obs: Observed, ends: Mapping[str, PodEnd], d: Draft) -> None:
    """The running attempt lost its admission: stop its pods gracefully and count it once."""
    st = d.status
    attempt = int(st["attempt"])
    if st.get("nextAttemptTime"):
        return  # no attempt is running (never started, or already stopped)
    if not any(p.attempt == attempt for p in obs.pods):
        st["nextAttemptTime"] = fmt_time(obs.now)  # recorded as created, never seen: nothing ran
        return
    pods = current_pods(obs, attempt)
    wl = obs.queue.workload if obs.queue else None
    ev = wl.evicted if wl is not None else None
    reason = kueue.eviction_reason(ev)
    if ev is not None:
        said = f"{ev.reason}: {ev.message}"
    else:
        said = "its Workload was deleted" if wl is None else "its Workload lost its admission"
    # A graceful stop: the trainer checkpoints on SIGTERM, so no step is lost.
    if not record_preemption(obs, d, reason, pods[0].name, said, lost=0):
        return
    st["attempt"] = attempt + 1
    st["nextAttemptTime"] = fmt_time(obs.now)
    for pod in pods:
        if not pod.gone and pod.deleting_since is None and ends[pod.name].outcome not in ENDED:
            d.delete.append(pod.name)
    d.events.append(
        Event(
            "Warning",
            "Preempted",
            f"Kueue took the job's quota ({said}): pods stop after checkpointing; attempt {attempt + 1} "
            "resumes from the checkpoint when Kueue admits the job again",
        )
    )


def suspend(obs: Observed, ends: Mapping[str, PodEnd], d: Draft) -> None:
    """A suspended job gives its quota back: its Workload is deactivated, and once Kueue evicted it and
    no pod of the job runs, its admission is cleared (the suspension itself stopped the pods)."""
    wl = obs.queue.workload if obs.queue else None
    if wl is None:
        return
    if wl.active:
        d.workload_active = False
    attempt = int(d.status["attempt"])
    if wl.evicted is not None and wl.quota_reserved and not live_before(obs, ends, attempt):
        d.workload_patch = kueue.unadmit_patch(wl, obs.now)
    d.status["kueue"] = {**(d.status.get("kueue") or {}), "admitted": False}


def finish(obs: Observed, d: Draft) -> None:
    """A finished job's Workload is marked Finished, so Kueue releases its quota at once."""
    wl = obs.queue.workload if obs.queue else None
    if wl is None or wl.finished:
        return
    succeeded = d.status.get("phase") == "Succeeded"
    d.workload_patch = kueue.finish_patch(wl, succeeded, str(d.status.get("message") or ""), obs.now)
