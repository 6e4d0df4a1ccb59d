"""How each trainer pod ended, and what the job does next: pure functions of what was observed.

`pods.classify` reads one pod the way a user would; `plan` takes the job, its current status and
its pods, and returns the new status plus the actions to take. It is the only place that decides;
the controller only gathers inputs and applies the plan.

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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from kubetune_operator import builders, tensorboard
from kubetune_operator.api import FineTuneJob
from kubetune_operator.pods import (
    CONFIG_WAIT_REASONS,
    ENDED,
    IMAGE_PULL_REASONS,
    Outcome,
    PodEnd,
    PodView,
    TrainerReport,
    classify,
)
from kubetune_operator.status import (
    FINISHED,
    fmt_time,
    format_eta,
    get_condition,
    parse_time,
    set_best,
    set_condition,
    set_phase,
)

# Which disruption reason names a gang restart when several pods ended: the most specific cause wins.
_REASON_RANK = (
    "PreemptionByScheduler",
    "DeletionByTaintManager",
    "EvictionByEvictionAPI",
    "DeletionByPodGC",
    "TerminationByKubelet",
    "Evicted",
    "SIGTERM",
    "SIGKILL",
    "PodDeleted",
)


@dataclass(frozen=True)
class Progress:
    """What the trainer's metrics endpoint said last (scraped by the controller)."""

    step: int
    total_steps: int | None = None
    epoch: int | None = None
    samples_per_second: float | None = None
    checkpoint_step: int | None = None
    loss: float | None = None
    accuracy: float | None = None
    steps_per_second: float | None = None
    top5: float | None = None
    best_metric: float | None = None  # checkpoint.best: the model in best/
    best_step: int | None = None


# What the plan does next within one reconcile (see _plan_training's loop).
_Step = Literal["start", "start-quiet", "judge"]


@dataclass(frozen=True)
class Settings:
    """Operator-wide timing knobs (CLI flags)."""

    backoff_base_seconds: float = 10.0
    backoff_max_seconds: float = 300.0
    start_timeout_seconds: float = 300.0
    stuck_terminating_seconds: float = 120.0
    wandb_url_base: str | None = None


@dataclass(frozen=True)
class CreateError:
    """The API server refused to create a child of `attempt` (the controller's last try)."""

    attempt: int
    kind: str
    name: str
    status: int  # HTTP status; 0 when the API could not be reached
    message: str
    retries: int = 0  # refusals in a row before this one

    @property
    def permanent(self) -> bool:
        """400/422: the object itself is invalid; only a spec change can help."""
        return self.status in (400, 422)


@dataclass(frozen=True)
class Observed:
    job: FineTuneJob
    status: Mapping[str, Any]
    pods: Sequence[PodView]
    now: datetime
    progress: Progress | None = None
    missing: tuple[str, ...] = ()  # dependencies that do not exist yet (dataset claim, secret)
    unready_nodes: frozenset[str] = frozenset()  # nodes NotReady or gone (for stuck pods)
    tensorboard_server: tensorboard.ServerView | None = None  # the standalone TensorBoard pod
    tensorboard_error: str | None = None  # why the last TensorBoard create failed (the API's words)
    existing_claim_modes: tuple[str, ...] | None = None  # spec.checkpoint.existingClaim's; None: not found
    create_error: CreateError | None = None  # the API refused a child of the current attempt

    @property
    def claim_modes(self) -> tuple[str, ...] | None:
        """Access modes of the checkpoint claim (None: the existing claim was not found)."""
        if self.job.spec.checkpoint.existing_claim:
            return self.existing_claim_modes
        return tensorboard.own_claim_modes(self.job)


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    status: dict[str, Any]
    create: tuple[dict[str, Any], ...] = ()  # children to create if absent (PVC, ConfigMap, Service, Pods)
    # TensorBoard objects to create if absent: applied last, and their failure never stops the rest.
    tensorboard_create: tuple[dict[str, Any], ...] = ()
    delete_pods: tuple[str, ...] = ()  # graceful deletes
    delete_services: tuple[str, ...] = ()
    force_delete_pods: tuple[str, ...] = ()  # grace 0: pods stuck on a lost node
    delete_job: bool = False
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None
    preempted: str | None = None  # metric: disruption reason counted by this plan
    failed: str | None = None  # metric: failure cause counted by this plan
    lost_steps: int = 0
    started_attempt: int | None = None


@dataclass
class _Draft:
    status: dict[str, Any]
    create: list[dict[str, Any]] = field(default_factory=list)
    board_create: list[dict[str, Any]] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    delete_services: list[str] = field(default_factory=list)
    force: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue: list[float] = field(default_factory=list)
    preempted: str | None = None
    failed: str | None = None
    lost: int = 0
    started: int | None = None
    delete_job: bool = False

    def finish(self) -> Plan:
        return Plan(
            status=self.status,
            create=tuple(self.create),
            tensorboard_create=tuple(self.board_create),
            delete_pods=tuple(dict.fromkeys(self.delete)),
            delete_services=tuple(dict.fromkeys(self.delete_services)),
            force_delete_pods=tuple(dict.fromkeys(self.force)),
            delete_job=self.delete_job,
            events=tuple(self.events),
            requeue_after=min(self.requeue) if self.requeue else None,
            preempted=self.preempted,
            failed=self.failed,
            lost_steps=self.lost,
            started_attempt=self.started,
        )


def backoff_seconds(failures: int, settings: Settings) -> float:
    """Exponential backoff after the n-th failure: base, 2*base, 4*base ... capped."""
    return float(min(settings.backoff_max_seconds, settings.backoff_base_seconds * 2 ** max(0, failures - 1)))


def plan(obs: Observed, settings: Settings) -> Plan:
    """Decide the next status and actions for one FineTuneJob: its trainer pods, then its TensorBoard."""
    d = _Draft(status=copy.deepcopy(dict(obs.status)))
    _plan_training(obs, settings, d)
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


def _plan_training(obs: Observed, settings: Settings, d: _Draft) -> None:
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
    _force_stuck(obs, settings, d)

    if st.get("phase") in FINISHED:
        _tear_down_live(obs, ends, d, attempt_below=None)
        _ttl(obs, d)
        return

    if "attempt" not in st:
        st["attempt"] = 1
        st["nextAttemptTime"] = fmt_time(now)

    if _deadline_passed(obs, d):
        return

    attempt = int(st["attempt"])
    _tear_down_live(obs, ends, d, attempt_below=attempt)

    if job.spec.run_policy.suspend:
        _suspend(obs, ends, d)
        return
    if st.get("phase") == "Suspended":
        _mark(d, obs, "Pending", "Resumed", f"resuming: attempt {attempt} will continue from the checkpoint")

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
    step: _Step | None = "start" if st.get("nextAttemptTime") else "judge"
    for _ in range(3):
        if step == "start":
            step = _start_attempt(obs, ends, d, settings)
        elif step == "start-quiet":
            step = _start_attempt(obs, ends, d, settings, announce=False)
        elif step == "judge":
            attempt = int(st["attempt"])
            if any(p.attempt == attempt for p in obs.pods):
                _unblock(obs, d)
            step = _judge_attempt(obs, _current_pods(obs, attempt), ends, d, settings)
        else:
            return
    assert step is None, f"lifecycle loop did not settle ({step})"


def _mark(d: _Draft, obs: Observed, phase: str, reason: str, message: str) -> None:
    set_phase(d.status, phase, reason, message, obs.now, obs.job.ref.generation)


def _restart_cause(st: Mapping[str, Any], fallback: str) -> str:
    """While a job is Restarting, its condition's reason stays the cause of the restart (the disruption
    or failure); the progress of the replacement attempt goes in the message only."""
    if st.get("phase") == "Restarting":
        cond = get_condition(st, "Restarting")
        if cond and cond.get("status") == "True" and cond.get("reason"):
            return str(cond["reason"])
    return fallback


def _force_stuck(obs: Observed, settings: Settings, d: _Draft) -> None:
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


def _say_held(obs: Observed, d: _Draft, held: list[str]) -> None:
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


def _tear_down_live(obs: Observed, ends: Mapping[str, PodEnd], d: _Draft, attempt_below: int | None) -> None:
    """Delete pods that should not run: older attempts' pods, or every pod once the job finished."""
    for pod in obs.pods:
        if attempt_below is not None and pod.attempt >= attempt_below:
            continue
        if pod.gone or pod.deleting_since is not None or ends[pod.name].outcome in ENDED:
            continue
        d.delete.append(pod.name)


def _live(obs: Observed, ends: Mapping[str, PodEnd], attempt_below: int) -> list[PodView]:
    return [
        p for p in obs.pods if p.attempt < attempt_below and not p.gone and ends[p.name].outcome not in ENDED
    ]


def _ttl(obs: Observed, d: _Draft) -> None:
    ttl = obs.job.spec.run_policy.ttl_seconds_after_finished
    done = parse_time(d.status.get("completionTime"))
    if ttl is None or done is None:
        return
    left = (done + timedelta(seconds=ttl) - obs.now).total_seconds()
    if left <= 0:
        d.delete_job = True
    else:
        d.requeue.append(left)


def _deadline_passed(obs: Observed, d: _Draft) -> bool:
    limit = obs.job.spec.run_policy.active_deadline_seconds
    started = parse_time(d.status.get("startTime"))
    if limit is None or started is None:
        return False
    left = (started + timedelta(seconds=limit) - obs.now).total_seconds()
    if left > 0:
        d.requeue.append(left)
        return False
    _fail(obs, d, "DeadlineExceeded", f"the job ran longer than runPolicy.activeDeadlineSeconds ({limit}s)")
    return True


def _fail(obs: Observed, d: _Draft, reason: str, message: str) -> None:
    _mark(d, obs, "Failed", reason, message)
    _unblock(obs, d, "the job failed")
    d.status["completionTime"] = fmt_time(obs.now)
    d.status.pop("nextAttemptTime", None)
    d.events.append(Event("Warning", reason, message))
    ends = {p.name: classify(p, obs.now) for p in obs.pods}
    _tear_down_live(obs, ends, d, attempt_below=None)
    _ttl(obs, d)


def _suspend(obs: Observed, ends: Mapping[str, PodEnd], d: _Draft) -> None:
    st = d.status
    attempt = int(st["attempt"])
    if not st.get("nextAttemptTime"):
        # The running attempt is stopped on purpose: its pods checkpoint on SIGTERM; not a preemption.
        st["attempt"] = attempt + 1
        st["nextAttemptTime"] = fmt_time(obs.now)
        for pod in _current_pods(obs, attempt):
            if not pod.gone and pod.deleting_since is None and ends[pod.name].outcome not in ENDED:
                d.delete.append(pod.name)
    _unblock(obs, d, "the job is suspended")
    if st.get("phase") != "Suspended":
        _mark(d, obs, "Suspended", "Suspended", "runPolicy.suspend is true: pods stopped after checkpointing")
        d.events.append(
            Event("Normal", "Suspended", "job suspended; it resumes from its checkpoint when unsuspended")
        )


def _missing_message(missing: Sequence[str]) -> str:
    return "waiting for " + "; ".join(missing)


def _start_attempt(
    obs: Observed, ends: Mapping[str, PodEnd], d: _Draft, settings: Settings, announce: bool = True
) -> _Step | None:
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
    phase = "Pending" if attempt == 1 else "Restarting"
    if obs.missing:
        _mark(d, obs, phase, "WaitingForDependencies", _missing_message(obs.missing))
        d.requeue.append(10.0)
        return None
    live = _live(obs, ends, attempt)
    if live:
        if announce:
            msg = f"waiting for {len(live)} pod(s) of the previous attempt to stop"
            _mark(d, obs, phase, _restart_cause(st, "WaitingForPreviousAttempt"), msg)
        return None
    if due > now:
        d.requeue.append((due - now).total_seconds())
        if st.get("phase") != phase:
            _mark(d, obs, phase, "BackoffWaiting", f"attempt {attempt} starts at {fmt_time(due)}")
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
    d.create.extend(p for p in fresh if p["metadata"]["name"] not in seen)
    d.started = attempt
    st.pop("nextAttemptTime", None)  # recorded before the create: this attempt's pods are never re-created
    ckpt = (st.get("checkpoint") or {}).get("step")
    resume = f"resuming from checkpoint step {ckpt}" if ckpt is not None else "starting from scratch"
    blocked = get_condition(st, "Blocked")
    if announce and not (blocked and blocked.get("status") == "True"):  # a retry keeps the refusal shown
        phase = "Pending" if st.get("phase") in (None, "Pending") else "Restarting"
        msg = f"attempt {attempt}: {job.spec.workers} pod(s) created, {resume}"
        _mark(d, obs, phase, _restart_cause(st, "PodsCreated"), msg)
    d.events.append(
        Event("Normal", "AttemptStarted", f"attempt {attempt}: created {job.spec.workers} pod(s), {resume}")
    )
    return None


def _unblock(obs: Observed, d: _Draft, why: str = "") -> None:
    """A Blocked condition from a refused create turns False: the attempt's pods exist (or, with `why`,
    the job stopped creating pods)."""
    cond = get_condition(d.status, "Blocked")
    if cond is not None and cond.get("status") == "True":
        reason, msg = ("Stopped", why) if why else ("Created", "the API server accepted the attempt's pods")
        set_condition(d.status, "Blocked", False, reason, msg, obs.now, obs.job.ref.generation)


def _current_pods(obs: Observed, attempt: int) -> list[PodView]:
    """Views of every rank of `attempt`; a rank with no pod at all is reported as gone."""
    by_rank = {p.rank: p for p in obs.pods if p.attempt == attempt}
    return [
        by_rank.get(r)
        or PodView(name=builders.pod_name(obs.job.ref.name, attempt, r), attempt=attempt, rank=r, gone=True)
        for r in range(obs.job.spec.workers)
    ]


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


def _create_refused(obs: Observed, err: CreateError, d: _Draft, settings: Settings) -> None:
    """The API refused a child of the current attempt: say so, quoting it; retry later unless hopeless.

    Nothing is counted: no pod ran, so it is neither a failure nor a preemption."""
    st, attempt = d.status, int(d.status["attempt"])
    where = job_field(err.message)
    fix = f" (check {where})" if where else ""
    said = f"the API server refused {err.kind} {err.name}"
    said += f" (HTTP {err.status}): {err.message}" if err.status else f": {err.message}"
    if err.permanent:
        _fail(obs, d, "InvalidSpec", f"{said}{fix}; retrying cannot help: fix the spec and re-create the job")
        return
    delay = backoff_seconds(err.retries + 1, settings)
    st["nextAttemptTime"] = fmt_time(obs.now + timedelta(seconds=delay))
    d.requeue.append(delay)
    phase = "Pending" if attempt == 1 or st.get("phase") in (None, "Pending") else "Restarting"
    msg = f"attempt {attempt}: {said}{fix}; retrying with backoff"
    _mark(d, obs, phase, _restart_cause(st, "CreateRefused"), msg)
    blocked = get_condition(st, "Blocked")
    if blocked is None or blocked.get("status") != "True" or blocked.get("message") != msg:
        set_condition(st, "Blocked", True, "CreateRefused", msg, obs.now, obs.job.ref.generation)
        d.events.append(Event("Warning", "CreateRefused", msg))


def _gang(current: Sequence[PodView], ends: Mapping[str, PodEnd], now: datetime) -> tuple[PodView, PodEnd]:
    """The attempt's outcome from its pods: one disrupted or failed pod ends the whole gang."""
    judged = [(p, ends.get(p.name) or classify(p, now)) for p in current]
    for wanted in (Outcome.DISRUPTED, Outcome.PERMANENT, Outcome.FAILED, Outcome.TERMINATING):
        hits = [(p, e) for p, e in judged if e.outcome == wanted]
        if hits:
            return min(
                hits, key=lambda pe: _REASON_RANK.index(pe[1].reason) if pe[1].reason in _REASON_RANK else 99
            )
    if all(e.outcome == Outcome.SUCCEEDED for _, e in judged):
        return judged[0]
    for wanted in (Outcome.PENDING, Outcome.RUNNING):
        for p, e in judged:
            if e.outcome == wanted:
                return p, e
    return judged[0]


def _absorb_report(st: dict[str, Any], report: TrainerReport | None, now: datetime) -> None:
    if report is None:
        return
    prog = st.setdefault("progress", {})
    if report.step is not None:
        prog["step"] = report.step
    if report.total_steps:
        prog["totalSteps"] = report.total_steps
        prog["percent"] = int(100 * (prog.get("step") or 0) // report.total_steps)
    if report.epoch is not None:
        prog["epoch"] = report.epoch
    if report.checkpoint_step is not None and report.checkpoint_step != (st.get("checkpoint") or {}).get(
        "step"
    ):
        st["checkpoint"] = {
            "step": report.checkpoint_step,
            "path": report.checkpoint or "",
            "time": fmt_time(now),
        }
    # The trainer's bestMetric/bestStep/bestMetricName, where pods.parse_report reads them.
    set_best(
        st,
        report.best_metric,
        report.best_step,
        report.best_metric_name,
    )


def _absorb_progress(st: dict[str, Any], progress: Progress | None, now: datetime) -> None:
    if progress is None:
        return
    prog = st.setdefault("progress", {})
    prog["step"] = progress.step
    if progress.total_steps:
        prog["totalSteps"] = progress.total_steps
        prog["percent"] = int(100 * progress.step // progress.total_steps)
        if progress.steps_per_second:
            prog["eta"] = format_eta((progress.total_steps - progress.step) / progress.steps_per_second)
    if progress.epoch is not None:
        prog["epoch"] = progress.epoch
    if progress.samples_per_second is not None:
        prog["samplesPerSecond"] = round(progress.samples_per_second, 2)
    if progress.checkpoint_step is not None and progress.checkpoint_step != (st.get("checkpoint") or {}).get(
        "step"
    ):
        st["checkpoint"] = {"step": progress.checkpoint_step, "path": "", "time": fmt_time(now)}
    metrics = st.setdefault("metrics", {})
    if progress.loss is not None:
        metrics["loss"] = round(progress.loss, 5)
    if progress.accuracy is not None:
        metrics["accuracy"] = round(progress.accuracy, 5)
    if progress.top5 is not None:
        metrics["top5"] = round(progress.top5, 5)
    if not metrics:
        del st["metrics"]
    set_best(st, progress.best_metric, progress.best_step)


def _judge_attempt(
    obs: Observed, current: Sequence[PodView], ends: Mapping[str, PodEnd], d: _Draft, settings: Settings
) -> _Step | None:
    """How the live attempt stands, from its pods, and what that does: the action table `_ON_OUTCOME`."""
    st, now = d.status, obs.now
    pod, end = _gang(current, ends, now)
    _absorb_progress(st, obs.progress, now)
    _absorb_report(st, pod.report, now)
    others = [p.name for p in current if p.name != pod.name and not p.gone and p.deleting_since is None]
    others = [n for n in others if ends[n].outcome not in ENDED]
    return _ON_OUTCOME[end.outcome](_Judged(obs, current, ends, pod, end, others, d, settings))


@dataclass(frozen=True)
class _Judged:
    """One attempt's outcome, as the action table's entries take it."""

    obs: Observed
    current: Sequence[PodView]
    ends: Mapping[str, PodEnd]
    pod: PodView  # the pod that decides the gang's outcome
    end: PodEnd
    others: list[str]  # pods of the gang still running
    d: _Draft
    settings: Settings


def _on_succeeded(j: _Judged) -> _Step | None:
    _succeed(j.obs, j.pod, j.d)
    return None


def _on_permanent(j: _Judged) -> _Step | None:
    j.d.failed = "InvalidConfig"
    _fail(
        j.obs, j.d, "InvalidConfig", f"pod {j.pod.name}: {j.end.message} (retrying cannot help; fix the spec)"
    )
    return None


def _on_disrupted(j: _Judged) -> _Step | None:
    # Counted; the replacement starts in the same reconcile when nothing of the old attempt still runs.
    return "start-quiet" if _count_disruption(j.obs, j.pod, j.end, j.d, j.others) else None


def _on_failed(j: _Judged) -> _Step | None:
    _count_failure(j.obs, j.pod, j.end, j.d, j.others, j.settings)
    return None


def _on_terminating(j: _Judged) -> _Step | None:
    if j.d.status.get("phase") != "Restarting":
        msg = f"pod {j.pod.name}: {j.end.reason}; waiting for it to checkpoint and stop"
        _mark(j.d, j.obs, "Restarting", j.end.reason, msg)
    return None


def _on_live(j: _Judged) -> _Step | None:
    """Pending or Running: the phase follows the pods; a pod that cannot start says why."""
    st, obs, pod, now = j.d.status, j.obs, j.pod, j.obs.now
    attempt = int(st["attempt"])
    all_running = all(j.ends.get(p.name, classify(p, now)).outcome == Outcome.RUNNING for p in j.current)
    if all_running:
        if st.get("phase") != "Running":
            _mark(j.d, obs, "Running", "Running", f"attempt {attempt}: {len(j.current)} pod(s) running")
    else:
        phase = "Pending" if attempt == 1 else "Restarting"
        if pod.waiting_reason in IMAGE_PULL_REASONS + CONFIG_WAIT_REASONS:
            msg = f"pod {pod.name}: {pod.waiting_reason}: {pod.waiting_message}".rstrip(": ")
            if st.get("message") != msg:
                _mark(j.d, obs, phase, pod.waiting_reason or "Waiting", msg)
        elif st.get("phase") != phase:
            _mark(j.d, obs, phase, j.end.reason, f"attempt {attempt}: waiting for pods to start")
        # Otherwise keep the condition that says why this attempt exists (e.g. the disruption reason).
    if pod.waiting_reason in IMAGE_PULL_REASONS + CONFIG_WAIT_REASONS and pod.created:
        waited = (now - pod.created).total_seconds()
        j.d.requeue.append(max(1.0, j.settings.start_timeout_seconds - waited + 1))
    return None


# How the attempt ended -> what the job does (as jobset's failure-policy action table).
_ON_OUTCOME: dict[Outcome, Callable[[_Judged], _Step | None]] = {
    Outcome.SUCCEEDED: _on_succeeded,
    Outcome.PERMANENT: _on_permanent,
    Outcome.DISRUPTED: _on_disrupted,
    Outcome.FAILED: _on_failed,
    Outcome.TERMINATING: _on_terminating,
    Outcome.PENDING: _on_live,
    Outcome.RUNNING: _on_live,
}


def _succeed(obs: Observed, pod: PodView, d: _Draft) -> None:
    """The trainer exited 0: it trained to the end (Completed) or training.earlyStopping ended it."""
    st, report = d.status, pod.report
    st["completionTime"] = fmt_time(obs.now)
    prog = st.setdefault("progress", {})
    early = report is not None and report.reason == "EarlyStopped"
    if early:
        # Stopped before totalSteps: the step it stopped at stays (_absorb_report set it).
        total, step = prog.get("totalSteps"), prog.get("step")
        prog["percent"] = int(100 * int(step or 0) // int(total)) if total else 100
    else:
        if prog.get("totalSteps"):
            prog["step"] = prog["totalSteps"]
        prog["percent"] = 100
    prog.pop("eta", None)
    if report and report.lost_steps is not None:
        st["lostSteps"] = max(int(st.get("lostSteps") or 0), report.lost_steps)
    counts = f"in {st['attempt']} attempt(s), {st['preemptions']} preemption(s), {st['failures']} failure(s)"
    if early:
        assert report is not None
        reason, msg = "EarlyStopped", f"training stopped early {counts}: {report.message}"
    else:
        reason, msg = "Completed", f"training finished {counts}"
    _mark(d, obs, "Succeeded", reason, msg)
    d.events.append(Event("Normal", reason, msg))
    _ttl(obs, d)


def _next_attempt(d: _Draft, due: datetime) -> None:
    d.status["attempt"] = int(d.status["attempt"]) + 1
    d.status["nextAttemptTime"] = fmt_time(due)


def _resume_step(st: Mapping[str, Any]) -> int | None:
    return (st.get("checkpoint") or {}).get("step")


def _count_disruption(obs: Observed, pod: PodView, end: PodEnd, d: _Draft, others: list[str]) -> bool:
    """Count one disruption and schedule the next attempt now; False when the job fails instead."""
    st, now = d.status, obs.now
    st["preemptions"] = int(st.get("preemptions") or 0) + 1
    by_reason = dict(st.get("preemptionsByReason") or {})
    by_reason[end.reason] = int(by_reason.get(end.reason, 0)) + 1
    st["preemptionsByReason"] = by_reason
    st["lastDisruption"] = {
        "reason": end.reason,
        "time": fmt_time(now),
        "pod": pod.name,
        "message": end.message,
    }
    lost = _lost_steps(st, pod.report)
    st["lostSteps"] = int(st.get("lostSteps") or 0) + lost
    d.preempted, d.lost = end.reason, lost
    limit = obs.job.spec.run_policy.max_preemptions
    if limit is not None and st["preemptions"] > limit:
        _fail(
            obs,
            d,
            "TooManyPreemptions",
            f"{st['preemptions']} preemptions exceed runPolicy.maxPreemptions ({limit})",
        )
        return False
    d.delete.extend(others)
    step = _resume_step(st)
    _next_attempt(d, now)
    resume = f"checkpoint step {step}" if step is not None else "the start (no checkpoint yet)"
    msg = f"pod {pod.name}: {end.reason}; attempt {st['attempt']} resumes from {resume} (lost {lost} step(s))"
    _mark(d, obs, "Restarting", end.reason, msg)
    d.events.append(Event("Warning", "Preempted", msg))
    return True


def _count_failure(
    obs: Observed, pod: PodView, end: PodEnd, d: _Draft, others: list[str], settings: Settings
) -> None:
    st, now = d.status, obs.now
    st["failures"] = int(st.get("failures") or 0) + 1
    d.failed = end.reason
    limit = obs.job.spec.run_policy.backoff_limit
    if st["failures"] > limit:
        _fail(
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
    _mark(d, obs, "Restarting", end.reason, msg)
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
