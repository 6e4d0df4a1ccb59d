"""Stopping what must not run, and ending the job: pods of older attempts (or of a finished job) are
deleted, pods stuck Terminating on a lost node are force-deleted, a job past its deadline fails (and a
refused create's Blocked condition turns False), and a finished job is deleted once its TTL has passed."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta

from kubetune_operator.plan_types import Draft, Event, Observed, Settings, mark
from kubetune_operator.pods import ENDED, PodEnd, PodView, classify
from kubetune_operator.status import fmt_time, get_condition, parse_time, set_condition


def force_stuck(obs: Observed, settings: Settings, d: Draft) -> None:
    """Pods stuck Terminating on a node that is NotReady or gone: force-delete so the job can move on.

    The limit counts from metadata.deletionTimestamp, which is when the pod's grace period ended (delete
    time + grace): a pod is stuck when it outlived its grace period by `stuck_terminating_seconds`. Every
    Terminating pod gets a re-check at that moment, so nothing else has to wake the job. A pod that
    stays after the force-delete is held by a finalizer: that is said once, in the message, not retried."""
    limit = timedelta(seconds=settings.stuck_terminating_seconds)
    held: list[str] = []
    for pod in obs.pods:
        if pod.gone or pod.deleting_since is None:
            continue
        due = pod.deleting_since + limit
        if obs.now < due:
            d.requeue.append((due - obs.now).total_seconds())
            continue
        if pod.node_name not in obs.unready_nodes:
            continue
        if pod.force_deleted:
            msg = f"pod {pod.name} stays Terminating after a force-delete"
            if pod.finalizers:
                msg += f": it is held by finalizer {', '.join(pod.finalizers)}, which only its owner removes"
            held.append(msg)
            continue
        d.force.append(pod.name)
        d.events.append(
            Event(
                "Warning",
                "ForceDeleted",
                f"pod {pod.name} was stuck Terminating on unreachable node {pod.node_name}; force-deleted",
            )
        )
    _say_held(obs, d, held)


def _say_held(obs: Observed, d: Draft, held: list[str]) -> None:
    """The StuckTerminating condition: True (and one Event) while a force-deleted pod stays."""
    cond = get_condition(d.status, "StuckTerminating")
    gen = obs.job.ref.generation
    if held:
        msg = "; ".join(held)
        if cond is None or cond.get("status") != "True" or cond.get("message") != msg:
            set_condition(d.status, "StuckTerminating", True, "HeldByFinalizer", msg, obs.now, gen)
            d.events.append(Event("Warning", "StuckTerminating", msg))
    elif cond is not None and cond.get("status") == "True":
        set_condition(
            d.status, "StuckTerminating", False, "Released", "no pod is stuck Terminating", obs.now, gen
        )


def tear_down_live(obs: Observed, ends: Mapping[str, PodEnd], d: Draft, attempt_below: int | None) -> None:
    """Delete pods that should not run: older attempts' pods, or every pod once the job finished."""
    for pod in obs.pods:
        if attempt_below is not None and pod.attempt >= attempt_below:
            continue
        if pod.gone or pod.deleting_since is not None or ends[pod.name].outcome in ENDED:
            continue
        d.delete.append(pod.name)


def live_before(obs: Observed, ends: Mapping[str, PodEnd], attempt_below: int) -> list[PodView]:
    return [
        p for p in obs.pods if p.attempt < attempt_below and not p.gone and ends[p.name].outcome not in ENDED
    ]


def ttl_after_finished(obs: Observed, d: Draft) -> None:
    ttl = obs.job.spec.run_policy.ttl_seconds_after_finished
    done = parse_time(d.status.get("completionTime"))
    if ttl is None or done is None:
        return
    left = (done + timedelta(seconds=ttl) - obs.now).total_seconds()
    if left <= 0:
        d.delete_job = True
    else:
        d.requeue.append(left)


def deadline_passed(obs: Observed, d: Draft) -> bool:
    limit = obs.job.spec.run_policy.active_deadline_seconds
    started = parse_time(d.status.get("startTime"))
    if limit is None or started is None:
        return False
    left = (started + timedelta(seconds=limit) - obs.now).total_seconds()
    if left > 0:
        d.requeue.append(left)
        return False
    fail(obs, d, "DeadlineExceeded", f"the job ran longer than runPolicy.activeDeadlineSeconds ({limit}s)")
    return True


def fail(obs: Observed, d: Draft, reason: str, message: str) -> None:
    mark(d, obs, "Failed", reason, message)
    unblock(obs, d, "the job failed")
    d.status["completionTime"] = fmt_time(obs.now)
    d.status.pop("nextAttemptTime", None)
    d.events.append(Event("Warning", reason, message))
    ends = {p.name: classify(p, obs.now) for p in obs.pods}
    tear_down_live(obs, ends, d, attempt_below=None)
    ttl_after_finished(obs, d)


def unblock(obs: Observed, d: Draft, why: str = "") -> None:
    """A Blocked condition from a refused create turns False: the attempt's pods exist (or, with `why`,
    the job stopped creating pods)."""
    cond = get_condition(d.status, "Blocked")
    if cond is not None and cond.get("status") == "True":
        reason, msg = ("Stopped", why) if why else ("Created", "the API server accepted the attempt's pods")
        set_condition(d.status, "Blocked", False, reason, msg, obs.now, obs.job.ref.generation)
