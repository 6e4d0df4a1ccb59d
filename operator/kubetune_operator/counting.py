"""Counting a disruption or a failure and scheduling the next attempt: the preemption and failure
counters, the steps lost since the last checkpoint, the backoff, and the limits that fail the job.

Each count happens in the status write that also bumps `status.attempt` (see `lifecycle`), so it happens
at most once."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from kubetune_operator.plan_types import Draft, Event, Observed, Settings, mark
from kubetune_operator.pods import PodEnd, PodView, TrainerReport
from kubetune_operator.status import fmt_time, get_condition
from kubetune_operator.teardown import fail


def backoff_seconds(failures: int, settings: Settings) -> float:
    """Exponential backoff after the n-th failure: base, 2*base, 4*base ... capped."""
    return float(min(settings.backoff_max_seconds, settings.backoff_base_seconds * 2 ** max(0, failures - 1)))


def restart_cause(st: Mapping[str, Any], fallback: str) -> str:
    """While a job is Restarting, its condition's reason stays the cause of the restart (the disruption
    or failure); the progress of the replacement attempt goes in the message only."""
    if st.get("phase") == "Restarting":
        cond = get_condition(st, "Restarting")
        if cond and cond.get("status") == "True" and cond.get("reason"):
            return str(cond["reason"])
    return fallback


def _next_attempt(d: Draft, due: datetime) -> None:
    d.status["attempt"] = int(d.status["attempt"]) + 1
    d.status["nextAttemptTime"] = fmt_time(due)


def _resume_step(st: Mapping[str, Any]) -> int | None:
    return (st.get("checkpoint") or {}).get("step")


def record_preemption(obs: Observed, d: Draft, reason: str, pod: str, message: str, lost: int) -> bool:
    """Count one preemption under `reason` (the counters, lastDisruption, the lost steps, the metric);
    False when it exceeds runPolicy.maxPreemptions, which fails the job."""
    st = d.status
    st["preemptions"] = int(st.get("preemptions") or 0) + 1
    by_reason = dict(st.get("preemptionsByReason") or {})
    by_reason[reason] = int(by_reason.get(reason, 0)) + 1
    st["preemptionsByReason"] = by_reason
    st["lastDisruption"] = {"reason": reason, "time": fmt_time(obs.now), "pod": pod, "message": message}
    st["lostSteps"] = int(st.get("lostSteps") or 0) + lost
    d.preempted, d.lost = reason, lost
    limit = obs.job.spec.run_policy.max_preemptions
    if limit is not None and st["preemptions"] > limit:
        fail(
            obs,
            d,
            "TooManyPreemptions",
            f"{st['preemptions']} preemptions exceed runPolicy.maxPreemptions ({limit})",
        )
        return False
    return True


def count_disruption(obs: Observed, pod: PodView, end: PodEnd, d: Draft, others: list[str]) -> bool:
    """Count one disruption and schedule the next attempt now; False when the job fails instead."""
    st, now = d.status, obs.now
    lost = _lost_steps(st, pod.report)
    if not record_preemption(obs, d, end.reason, pod.name, end.message, lost):
        return False
    d.delete.extend(others)
    step = _resume_step(st)
    _next_attempt(d, now)
    resume = f"checkpoint step {step}" if step is not None else "the start (no checkpoint yet)"
    msg = f"pod {pod.name}: {end.reason}; attempt {st['attempt']} resumes from {resume} (lost {lost} step(s))"
    mark(d, obs, "Restarting", end.reason, msg)
    d.events.append(Event("Warning", "Preempted", msg))
    return True


def count_failure(
    obs: Observed, pod: PodView, end: PodEnd, d: Draft, others: list[str], settings: Settings
) -> None:
    st, now = d.status, obs.now
    st["failures"] = int(st.get("failures") or 0) + 1
    d.failed = end.reason
    limit = obs.job.spec.run_policy.backoff_limit
    if st["failures"] > limit:
        fail(
            obs,
            d,
            "BackoffLimitExceeded",
            f"pod {pod.name}: {end.message}; {st['failures']} failure(s) exceed runPolicy.backoffLimit ({limit})",
        )
        return
    d.delete.extend(others)
    wait = backoff_seconds(st["failures"], settings)
    _next_attempt(d, now + timedelta(seconds=wait))
    step = _resume_step(st)
    resume = f"checkpoint step {step}" if step is not None else "the start"
    msg = (
        f"pod {pod.name} failed: {end.reason} ({end.message}); failure {st['failures']}/{limit}; "
        f"attempt {st['attempt']} in {wait:.0f}s resumes from {resume}"
    )
    mark(d, obs, "Restarting", end.reason, msg)
    d.events.append(Event("Warning", "Failed", msg))
    d.requeue.append(wait)


def _lost_steps(st: Mapping[str, Any], report: TrainerReport | None) -> int:
    """Steps trained since the last checkpoint, which the next attempt must train again."""
    if report is not None and report.step is not None and report.checkpoint_step is not None:
        return max(0, report.step - report.checkpoint_step)
    step = (st.get("progress") or {}).get("step")
    ckpt = _resume_step(st)
    if step is None:
        return 0
    return max(0, int(step) - int(ckpt or 0))
