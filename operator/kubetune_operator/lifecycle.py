"""How each trainer pod ended, and what the job does next: pure functions of what was observed.

`pods.classify` reads one pod the way a user would; `plan` takes the job, its current status and
its pods, and returns the new status plus the actions to take. It is the only place that decides;
the controller only gathers inputs and applies the plan. This module holds the step loop and the
outcome -> action table; the steps' parts live beside it: `judging` (how the live attempt stands),
`counting` (disruptions, failures, backoff), `teardown` (stopping pods, failing and expiring the job),
and `plan_types` (the plan's inputs and outputs, re-exported here).

Restart bookkeeping lives in the status, so a restarted operator never double-counts:
- `status.attempt` is the attempt whose pods should exist; older attempts' pods are torn down.
- `status.nextAttemptTime` set means "attempt `status.attempt` is due but its pods are not created yet".
  It is cleared in the status write that precedes the pods' create, so an attempt's pods are created at
  most once: a reconcile that finds them gone (deleted before the watch showed them, or during a watch
  gap) counts a disruption and moves to the next attempt instead of creating a twin. Only a create the
  API refused (`Observed.create_error`) sets it again.
A disruption or failure is counted in the same status write that bumps `attempt`, and that write
carries the resourceVersion it was computed from, so it happens at most once.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

from kubetune_operator import builders, kueue, queueing, tensorboard
from kubetune_operator.counting import backoff_seconds, restart_cause
from kubetune_operator.judging import (
    Judged,
    current_pods,
    judge,
    on_disrupted,
    on_failed,
    on_live,
    on_permanent,
    on_succeeded,
    on_terminating,
)
from kubetune_operator.plan_types import (
    CreateError,
    Draft,
    Event,
    Observed,
    Plan,
    Progress,
    Settings,
    Step,
    mark,
)
from kubetune_operator.pods import ENDED, Outcome, PodEnd, PodView, classify
from kubetune_operator.status import FINISHED, fmt_time, get_condition, parse_time, set_condition
from kubetune_operator.teardown import (
    deadline_passed,
    fail,
    force_stuck,
    live_before,
    tear_down_live,
    ttl_after_finished,
    unblock,
)

# The plan's inputs and outputs live in plan_types; they are part of this module's interface.
__all__ = [
    "CreateError",
    "Event",
    "Observed",
    "Plan",
    "Progress",
    "Settings",
    "backoff_seconds",
    "job_field",
    "plan",
]


def plan(obs: Observed, settings: Settings) -> Plan:
    """Decide the next status and actions for one FineTuneJob: its trainer pods, then its TensorBoard."""
    d = Draft(status=copy.deepcopy(dict(obs.status)))
    _plan_training(obs, settings, d)
    if d.status.get("phase") in FINISHED:
        queueing.finish(obs, d)  # in the plan that ends the job: Kueue gets the quota back at once
    if tensorboard.involved(obs.job, d.status):
        inputs = tensorboard.Inputs(
            job=obs.job,
            pods=obs.pods,
            server=obs.tensorboard_server,
            claim_modes=obs.claim_modes,
            now=obs.now,
            start_timeout=settings.start_timeout_seconds,
            started_attempt=d.started,
            error=obs.tensorboard_error,
        )
        board = tensorboard.plan(inputs, d.status)
        d.board_create += board.create
        d.delete += board.delete_pods
        d.delete_services += board.delete_services
        d.requeue += board.requeue
    return d.finish()


def _plan_training(obs: Observed, settings: Settings, d: Draft) -> None:
    job, now = obs.job, obs.now
    st = d.status
    gen = job.ref.generation
    st["observedGeneration"] = gen
    st.setdefault("startTime", fmt_time(now))
    for key in ("preemptions", "failures", "lostSteps"):
        st.setdefault(key, 0)
    st.setdefault("preemptionsByReason", {})
    if not st.get("wandb"):
        st["wandb"] = {"runId": builders.run_id(job.ref.uid)}
        if settings.wandb_url_base:
            st["wandb"]["url"] = f"{settings.wandb_url_base.rstrip('/')}/{st['wandb']['runId']}"

    ends = {p.name: classify(p, now, settings.start_timeout_seconds) for p in obs.pods}
    force_stuck(obs, settings, d)

    if st.get("phase") in FINISHED:
        tear_down_live(obs, ends, d, attempt_below=None)
        ttl_after_finished(obs, d)
        return

    if "attempt" not in st:
        st["attempt"] = 1
        st["nextAttemptTime"] = fmt_time(now)

    if deadline_passed(obs, d):
        return

    attempt = int(st["attempt"])
    tear_down_live(obs, ends, d, attempt_below=attempt)

    if job.spec.run_policy.suspend:
        _suspend(obs, ends, d)
        queueing.suspend(obs, ends, d)
        return
    if st.get("phase") == "Suspended":
        mark(d, obs, "Pending", "Resumed", f"resuming: attempt {attempt} will continue from the checkpoint")
    if queueing.hold(obs, ends, d):
        return
    attempt = int(st["attempt"])

    seen = {p.rank for p in obs.pods if p.attempt == attempt}
    every_rank_seen = seen >= set(range(job.spec.workers))
    err = obs.create_error
    if err is not None and err.attempt == attempt and not every_rank_seen and not st.get("nextAttemptTime"):
        _create_refused(obs, err, d, settings)
        return

    if not st.get("nextAttemptTime") and not every_rank_seen:
        # Recorded as created, yet neither the watch, a GET nor this process's own creates know of the
        # missing ranks: the operator stopped (or lost the lease) between the status write and the create.
        # They are created now, and nothing is counted: no pod of theirs ever ran.
        st["nextAttemptTime"] = fmt_time(obs.now)

    # A small loop, not recursion: starting finds the attempt already live (judge it), and judging may
    # count a disruption whose replacement starts in this same reconcile (start, keeping its reason).
    step: Step | None = "start" if st.get("nextAttemptTime") else "judge"
    for _ in range(3):
        if step == "start":
            step = _start_attempt(obs, ends, d, settings)
        elif step == "start-quiet":
            step = _start_attempt(obs, ends, d, settings, announce=False)
        elif step == "judge":
            attempt = int(st["attempt"])
            if any(p.attempt == attempt for p in obs.pods):
                unblock(obs, d)
            step = _judge_attempt(obs, current_pods(obs, attempt), ends, d, settings)
        else:
            return
    assert step is None, f"lifecycle loop did not settle ({step})"


def _judge_attempt(
    obs: Observed, current: Sequence[PodView], ends: Mapping[str, PodEnd], d: Draft, settings: Settings
) -> Step | None:
    """How the live attempt stands, from its pods, and what that does: the action table `_ON_OUTCOME`."""
    j = judge(obs, current, ends, d, settings)
    return _ON_OUTCOME[j.end.outcome](j)


# How the attempt ended -> what the job does (as jobset's failure-policy action table).
_ON_OUTCOME: dict[Outcome, Callable[[Judged], Step | None]] = {
    Outcome.SUCCEEDED: on_succeeded,
    Outcome.PERMANENT: on_permanent,
    Outcome.DISRUPTED: on_disrupted,
    Outcome.FAILED: on_failed,
    Outcome.TERMINATING: on_terminating,
    Outcome.PENDING: on_live,
    Outcome.RUNNING: on_live,
}


def _suspend(obs: Observed, ends: Mapping[str, PodEnd], d: Draft) -> None:
    st = d.status
    attempt = int(st["attempt"])
    if not st.get("nextAttemptTime"):
        # The running attempt is stopped on purpose: its pods checkpoint on SIGTERM; not a preemption.
        st["attempt"] = attempt + 1
        st["nextAttemptTime"] = fmt_time(obs.now)
        for pod in current_pods(obs, attempt):
            if not pod.gone and pod.deleting_since is None and ends[pod.name].outcome not in ENDED:
                d.delete.append(pod.name)
    unblock(obs, d, "the job is suspended")
    if st.get("phase") != "Suspended":
        mark(d, obs, "Suspended", "Suspended", "runPolicy.suspend is true: pods stopped after checkpointing")
        d.events.append(
            Event("Normal", "Suspended", "job suspended; it resumes from its checkpoint when unsuspended")
        )


def _missing_message(missing: Sequence[str]) -> str:
    return "waiting for " + "; ".join(missing)


def _start_attempt(
    obs: Observed, ends: Mapping[str, PodEnd], d: Draft, settings: Settings, announce: bool = True
) -> Step | None:
    """Create the pods of the due attempt once the previous one is gone and its backoff has passed;
    "judge" when they exist already.

    `announce=False` keeps the phase and condition the caller just set (e.g. the disruption's reason)."""
    st, now = d.status, obs.now
    attempt = int(st["attempt"])
    due = parse_time(st.get("nextAttemptTime")) or now
    expected = {builders.pod_name(obs.job.ref.name, attempt, r) for r in range(obs.job.spec.workers)}
    seen = {p.name for p in obs.pods if p.attempt == attempt}
    if expected <= seen:
        # Created in an earlier reconcile (even if already gone again): the attempt is live; never a twin.
        st.pop("nextAttemptTime", None)
        return "judge"
    phase = "Pending" if attempt == 1 or st.get("phase") == "Queued" else "Restarting"
    if obs.missing:
        mark(d, obs, phase, "WaitingForDependencies", _missing_message(obs.missing))
        d.requeue.append(10.0)
        return None
    live = live_before(obs, ends, attempt)
    if live:
        if announce:
            msg = f"waiting for {len(live)} pod(s) of the previous attempt to stop"
            mark(d, obs, phase, restart_cause(st, "WaitingForPreviousAttempt"), msg)
        return None
    if due > now:
        d.requeue.append((due - now).total_seconds())
        if st.get("phase") != phase:
            mark(d, obs, phase, "BackoffWaiting", f"attempt {attempt} starts at {fmt_time(due)}")
        return None
    job = obs.job
    for child in (
        builders.checkpoint_pvc(job),
        builders.trainer_configmap(job),
        builders.headless_service(job),
    ):
        if child is not None:
            d.create.append(child)
    sidecar = tensorboard.sidecar_wanted(job, obs.claim_modes)
    # After a partly refused create, only the ranks never seen are created.
    fresh = builders.attempt_pods(job, attempt, tensorboard_sidecar=sidecar)
    if d.placement is not None:  # Kueue admitted the job onto these flavors
        for pod in fresh:
            kueue.apply_placement(pod, d.placement)
    d.create.extend(p for p in fresh if p["metadata"]["name"] not in seen)
    d.started = attempt
    st.pop("nextAttemptTime", None)  # recorded before the create: this attempt's pods are never re-created
    ckpt = (st.get("checkpoint") or {}).get("step")
    resume = f"resuming from checkpoint step {ckpt}" if ckpt is not None else "starting from scratch"
    blocked = get_condition(st, "Blocked")
    if announce and not (blocked and blocked.get("status") == "True"):  # a retry keeps the refusal shown
        phase = "Pending" if st.get("phase") in (None, "Pending") or attempt == 1 else "Restarting"
        msg = f"attempt {attempt}: {job.spec.workers} pod(s) created, {resume}"
        mark(d, obs, phase, restart_cause(st, "PodsCreated"), msg)
    d.events.append(
        Event("Normal", "AttemptStarted", f"attempt {attempt}: created {job.spec.workers} pod(s), {resume}")
    )
    return None


# Where a field of the pod (as the API server names it) comes from in the FineTuneJob.
_POD_FIELDS = (
    ("spec.containers[0].image", "spec.image"),
    ("spec.nodeSelector", "spec.nodeSelector"),
    ("spec.affinity", "spec.affinity"),
    ("spec.tolerations", "spec.tolerations"),
    ("spec.priorityClassName", "spec.priorityClassName"),
    ("spec.serviceAccountName", "spec.serviceAccountName"),
    ("metadata.labels", "spec.podTemplate.labels"),
    ("metadata.annotations", "spec.podTemplate.annotations"),
    ("spec.containers[0].env", "spec.podTemplate.env"),
    ("spec.containers[0].resources", "spec.resources"),
    ("spec.hostname", "metadata.name"),
    ("spec.subdomain", "metadata.name"),
    ("metadata.name", "metadata.name"),
)


_FIELD_HINTS = (
    ("PriorityClass", "spec.priorityClassName"),
    ("service account", "spec.serviceAccountName"),
    ("exceeded quota", "spec.resources"),
)


def job_field(message: str) -> str | None:
    """The FineTuneJob field behind an API server's refusal of a child, when its message names one."""
    for pod_field, job_field_ in _POD_FIELDS:
        if pod_field in message:
            return job_field_
    for words, job_field_ in _FIELD_HINTS:
        if words in message:
            return job_field_
    return None


def _create_refused(obs: Observed, err: CreateError, d: Draft, settings: Settings) -> None:
    """The API refused a child of the current attempt: say so, quoting it; retry later unless hopeless.

    Nothing is counted: no pod ran, so it is neither a failure nor a preemption."""
    st, attempt = d.status, int(d.status["attempt"])
    where = job_field(err.message)
    fix = f" (check {where})" if where else ""
    said = f"the API server refused {err.kind} {err.name}"
    said += f" (HTTP {err.status}): {err.message}" if err.status else f": {err.message}"
    if err.permanent:
        fail(obs, d, "InvalidSpec", f"{said}{fix}; retrying cannot help: fix the spec and re-create the job")
        return
    delay = backoff_seconds(err.retries + 1, settings)
    st["nextAttemptTime"] = fmt_time(obs.now + timedelta(seconds=delay))
    d.requeue.append(delay)
    phase = "Pending" if attempt == 1 or st.get("phase") in (None, "Pending") else "Restarting"
    msg = f"attempt {attempt}: {said}{fix}; retrying with backoff"
    mark(d, obs, phase, restart_cause(st, "CreateRefused"), msg)
    blocked = get_condition(st, "Blocked")
    if blocked is None or blocked.get("status") != "True" or blocked.get("message") != msg:
        set_condition(st, "Blocked", True, "CreateRefused", msg, obs.now, obs.job.ref.generation)
        d.events.append(Event("Warning", "CreateRefused", msg))
