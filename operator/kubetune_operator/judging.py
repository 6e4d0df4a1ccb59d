"""How the live attempt stands, from its pods: the outcome of the gang (one disrupted or failed pod ends
it), the trainer's progress taken into the status, and the handler for each outcome that
`lifecycle._ON_OUTCOME` maps it to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune_operator import builders
from kubetune_operator.counting import count_disruption, count_failure
from kubetune_operator.plan_types import Draft, Event, Observed, Progress, Settings, Step, mark
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
from kubetune_operator.status import fmt_time, format_eta, set_best
from kubetune_operator.teardown import fail, ttl_after_finished

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
class Judged:
    """One attempt's outcome, as the action table's entries take it."""

    obs: Observed
    current: Sequence[PodView]
    ends: Mapping[str, PodEnd]
    pod: PodView  # the pod that decides the gang's outcome
    end: PodEnd
    others: list[str]  # pods of the gang still running
    d: Draft
    settings: Settings


def judge(
    obs: Observed, current: Sequence[PodView], ends: Mapping[str, PodEnd], d: Draft, settings: Settings
) -> Judged:
    """How the live attempt stands, from its pods: the pod that decides the gang's outcome, with the
    trainer's progress taken into the status."""
    st, now = d.status, obs.now
    pod, end = _gang(current, ends, now)
    _absorb_progress(st, obs.progress, now)
    _absorb_report(st, pod.report, now)
    others = [p.name for p in current if p.name != pod.name and not p.gone and p.deleting_since is None]
    others = [n for n in others if ends[n].outcome not in ENDED]
    return Judged(obs, current, ends, pod, end, others, d, settings)


def current_pods(obs: Observed, attempt: int) -> list[PodView]:
    """Views of every rank of `attempt`; a rank with no pod at all is reported as gone."""
    by_rank = {p.rank: p for p in obs.pods if p.attempt == attempt}
    return [
        by_rank.get(r)
        or PodView(name=builders.pod_name(obs.job.ref.name, attempt, r), attempt=attempt, rank=r, gone=True)
        for r in range(obs.job.spec.workers)
    ]


def _gang(current: Sequence[PodView], ends: Mapping[str, PodEnd], now: datetime) -> tuple[PodView, PodEnd]:
    """The attempt's outcome from its pods: one disrupted or failed pod ends the whole gang."""
    judged = [(p, ends.get(p.name) or classify(p, now)) for p in current]

    def rank(pe: tuple[PodView, PodEnd]) -> int:
        return _REASON_RANK.index(pe[1].reason) if pe[1].reason in _REASON_RANK else 99

    for wanted in (Outcome.DISRUPTED, Outcome.PERMANENT, Outcome.FAILED, Outcome.TERMINATING):
        hits = [(p, e) for p, e in judged if e.outcome == wanted]
        if hits:
            pod, end = min(hits, key=rank)
            if wanted == Outcome.DISRUPTED:
                # A rank that stopped on the gang's all-reduced stop flag ends first with the generic
                # SIGTERM, while the rank the cluster disrupted (DisruptionTarget) is still terminating:
                # that one's cause names the restart.
                causes = [(p, e) for p, e in judged if e.outcome == Outcome.TERMINATING and p.disruption]
                if causes and rank(min(causes, key=rank)) < rank((pod, end)):
                    cause = min(causes, key=rank)[1]
                    end = PodEnd(Outcome.DISRUPTED, cause.reason, cause.message)
            return pod, end
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


def on_succeeded(j: Judged) -> Step | None:
    _succeed(j.obs, j.pod, j.d)
    return None


def on_permanent(j: Judged) -> Step | None:
    j.d.failed = "InvalidConfig"
    fail(
        j.obs, j.d, "InvalidConfig", f"pod {j.pod.name}: {j.end.message} (retrying cannot help; fix the spec)"
    )
    return None


def on_disrupted(j: Judged) -> Step | None:
    # Counted; the replacement starts in the same reconcile when nothing of the old attempt still runs.
    return "start-quiet" if count_disruption(j.obs, j.pod, j.end, j.d, j.others) else None


def on_failed(j: Judged) -> Step | None:
    count_failure(j.obs, j.pod, j.end, j.d, j.others, j.settings)
    return None


def on_terminating(j: Judged) -> Step | None:
    if j.d.status.get("phase") != "Restarting":
        msg = f"pod {j.pod.name}: {j.end.reason}; waiting for it to checkpoint and stop"
        mark(j.d, j.obs, "Restarting", j.end.reason, msg)
    return None


def on_live(j: Judged) -> Step | None:
    """Pending or Running: the phase follows the pods; a pod that cannot start says why."""
    st, obs, pod, now = j.d.status, j.obs, j.pod, j.obs.now
    attempt = int(st["attempt"])
    all_running = all(j.ends.get(p.name, classify(p, now)).outcome == Outcome.RUNNING for p in j.current)
    if all_running:
        if st.get("phase") != "Running":
            mark(j.d, obs, "Running", "Running", f"attempt {attempt}: {len(j.current)} pod(s) running")
    else:
        phase = "Pending" if attempt == 1 else "Restarting"
        if pod.waiting_reason in IMAGE_PULL_REASONS + CONFIG_WAIT_REASONS:
            msg = f"pod {pod.name}: {pod.waiting_reason}: {pod.waiting_message}".rstrip(": ")
            if st.get("message") != msg:
                mark(j.d, obs, phase, pod.waiting_reason or "Waiting", msg)
        elif st.get("phase") != phase:
            mark(j.d, obs, phase, j.end.reason, f"attempt {attempt}: waiting for pods to start")
        # Otherwise keep the condition that says why this attempt exists (e.g. the disruption reason).
    if pod.waiting_reason in IMAGE_PULL_REASONS + CONFIG_WAIT_REASONS and pod.created:
        waited = (now - pod.created).total_seconds()
        j.d.requeue.append(max(1.0, j.settings.start_timeout_seconds - waited + 1))
    return None


def _succeed(obs: Observed, pod: PodView, d: Draft) -> None:
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
    mark(d, obs, "Succeeded", reason, msg)
    d.events.append(Event("Normal", reason, msg))
    ttl_after_finished(obs, d)
