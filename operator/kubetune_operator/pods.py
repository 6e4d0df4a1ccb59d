"""How one trainer pod stands: a pod as the API shows it, reduced to what the lifecycle needs, and
classified the way a user would say it ("preempted by the scheduler", "OOM-killed", "finished")."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from kubetune_operator import builders
from kubetune_operator.status import parse_time

IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONFIG_WAIT_REASONS = ("CreateContainerConfigError", "CreateContainerError")
_START_REASONS = IMAGE_PULL_REASONS + CONFIG_WAIT_REASONS


class Outcome(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    TERMINATING = "Terminating"  # going away (disruption or deletion) but not finished yet
    SUCCEEDED = "Succeeded"
    DISRUPTED = "Disrupted"  # not the job's fault: never spends the failure budget
    FAILED = "Failed"  # retried with backoff until backoffLimit
    PERMANENT = "Permanent"  # retrying cannot help (trainer exit 2)


ENDED = (Outcome.SUCCEEDED, Outcome.DISRUPTED, Outcome.FAILED, Outcome.PERMANENT)


@dataclass(frozen=True)
class TrainerReport:
    """The trainer's one-line JSON termination message."""

    reason: str
    step: int | None = None
    total_steps: int | None = None
    epoch: int | None = None
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    lost_steps: int | None = None
    message: str = ""
    best_metric: float | None = None  # checkpoint.best: bestMetric, bestStep, bestMetricName
    best_step: int | None = None
    best_metric_name: str | None = None


def parse_report(text: str | None) -> TrainerReport | None:
    """The last JSON line with a `reason` in a termination message (logs may precede it), else None."""
    for line in reversed((text or "").strip().splitlines()):
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("reason"), str):

            def num(key: str, d: dict[str, Any] = doc) -> int | None:
                v = d.get(key)
                return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

            return TrainerReport(
                reason=doc["reason"],
                step=num("step"),
                total_steps=num("totalSteps"),
                epoch=num("epoch"),
                checkpoint=doc.get("checkpoint") if isinstance(doc.get("checkpoint"), str) else None,
                checkpoint_step=num("checkpointStep"),
                lost_steps=num("lostSteps"),
                message=str(doc.get("message") or ""),
                best_metric=float(doc["bestMetric"])
                if isinstance(doc.get("bestMetric"), (int, float))
                else None,
                best_step=num("bestStep"),
                best_metric_name=doc.get("bestMetricName")
                if isinstance(doc.get("bestMetricName"), str)
                else None,
            )
    return None


@dataclass(frozen=True)
class PodView:
    """What the lifecycle needs to know about one trainer pod."""

    name: str
    attempt: int
    rank: int
    phase: str = "Pending"
    ready: bool = False  # the pod's Ready condition is True (what Kueue's PodsReady counts)
    status_reason: str | None = None  # pod.status.reason, e.g. Evicted (kubelet node pressure)
    gone: bool = False  # no longer in the API
    deleting_since: datetime | None = None  # metadata.deletionTimestamp
    disruption: tuple[str, str] | None = None  # DisruptionTarget=True (reason, message)
    exit_code: int | None = None
    terminated_reason: str | None = None  # e.g. OOMKilled, Error, Completed
    report: TrainerReport | None = None
    waiting_reason: str | None = None
    waiting_message: str = ""
    created: datetime | None = None
    pod_ip: str | None = None
    node_name: str | None = None
    tensorboard: bool = False  # rank 0 with the TensorBoard sidecar (labelled as the job's server)
    tensorboard_ready: bool = False  # that sidecar passes its readiness probe
    finalizers: tuple[str, ...] = ()  # metadata.finalizers: a deleted pod stays until they are removed
    force_deleted: bool = False  # deleted with grace period 0 (deletionGracePeriodSeconds == 0)


def pod_view(pod: Mapping[str, Any], gone: bool = False) -> PodView:
    """Build a PodView from a pod as the API serialises it (camelCase keys)."""
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    labels = meta.get("labels") or {}
    disruption = None
    ready = False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            disruption = (str(cond.get("reason") or "Disrupted"), str(cond.get("message") or ""))
        elif cond.get("type") == "Ready":
            ready = cond.get("status") == "True"
    exit_code = terminated_reason = waiting = None
    waiting_message = ""
    message = None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") != "trainer":
            continue
        state = cs.get("state") or {}
        if state.get("terminated"):
            term = state["terminated"]
            exit_code = int(term.get("exitCode", 1))
            terminated_reason = term.get("reason")
            message = term.get("message")
        elif state.get("waiting"):
            waiting = state["waiting"].get("reason")
            waiting_message = str(state["waiting"].get("message") or "")
    # Only the trainer container says how the pod ended; a sidecar's exits and restarts never count.
    # But while a sidecar cannot start (its image cannot be pulled: it is the trainer's image), the
    # trainer waits in PodInitializing: report the sidecar's reason, so the start timeout still applies.
    sidecar_ready = False
    for cs in status.get("initContainerStatuses") or []:
        if cs.get("name") == builders.TENSORBOARD_CONTAINER:
            sidecar_ready = bool(cs.get("ready"))
        stuck = ((cs.get("state") or {}).get("waiting")) or {}
        if waiting in (None, "PodInitializing") and stuck.get("reason") in _START_REASONS:
            waiting, waiting_message = stuck["reason"], str(stuck.get("message") or "")
    return PodView(
        name=meta.get("name", ""),
        attempt=_int_label(labels, builders.LABEL_ATTEMPT),
        rank=_int_label(labels, builders.LABEL_RANK),
        phase=status.get("phase") or "Pending",
        ready=ready,
        status_reason=status.get("reason"),
        gone=gone,
        deleting_since=parse_time(meta.get("deletionTimestamp")),
        disruption=disruption,
        exit_code=exit_code,
        terminated_reason=terminated_reason,
        report=parse_report(message),
        waiting_reason=waiting,
        waiting_message=waiting_message,
        created=parse_time(meta.get("creationTimestamp")),
        pod_ip=status.get("podIP"),
        node_name=(pod.get("spec") or {}).get("nodeName"),
        tensorboard=labels.get(builders.LABEL_TENSORBOARD) == "true",
        tensorboard_ready=sidecar_ready,
        finalizers=tuple(str(f) for f in meta.get("finalizers") or ()),
        force_deleted=meta.get("deletionTimestamp") is not None
        and meta.get("deletionGracePeriodSeconds") == 0,
    )


def _int_label(labels: Mapping[str, str], key: str) -> int:
    try:
        return int(labels.get(key, "0"))
    except ValueError:
        return 0


@dataclass(frozen=True)
class PodEnd:
    outcome: Outcome
    reason: str
    message: str = ""


def classify(pod: PodView, now: datetime, start_timeout: float = 300.0) -> PodEnd:
    """How one pod stands. Disruptions are never the job's fault; exit 2 is never worth retrying."""
    if pod.gone:
        if pod.disruption:
            return PodEnd(Outcome.DISRUPTED, pod.disruption[0], pod.disruption[1])
        return PodEnd(Outcome.DISRUPTED, "PodDeleted", "the pod was deleted by someone other than kubetune")
    if pod.exit_code is not None:
        report = pod.report
        detail = (report.message if report else "") or f"exit code {pod.exit_code}"
        if pod.disruption:
            return PodEnd(Outcome.DISRUPTED, pod.disruption[0], pod.disruption[1])
        if pod.exit_code == 0:
            return PodEnd(Outcome.SUCCEEDED, "Completed", detail)
        if pod.exit_code == 2 or (report is not None and report.reason == "InvalidConfig"):
            return PodEnd(Outcome.PERMANENT, "InvalidConfig", detail)
        if pod.deleting_since is not None:
            # Someone deleted the pod (`kubectl delete pod`): that, not the SIGTERM it caused, is the reason.
            return PodEnd(Outcome.DISRUPTED, "PodDeleted", f"deleted while running ({detail})")
        if pod.exit_code == 143 or (report is not None and report.reason == "Preempted"):
            return PodEnd(Outcome.DISRUPTED, "SIGTERM", "the trainer was stopped by SIGTERM and checkpointed")
        if pod.terminated_reason == "OOMKilled":
            return PodEnd(
                Outcome.FAILED, "OOMKilled", "the trainer ran out of memory: raise resources.memory"
            )
        if pod.exit_code == 137:
            # SIGKILL from outside (the trainer never sends itself one; the OOM killer is reported above):
            # a node or runtime stopping the container without grace. Work since the checkpoint is lost.
            return PodEnd(Outcome.DISRUPTED, "SIGKILL", "the trainer was killed without a grace period")
        return PodEnd(Outcome.FAILED, "Error", detail)
    if pod.phase == "Failed":
        # The pod failed without its container ending: node pressure, node shutdown, admission.
        reason = pod.status_reason or "NodeFailure"
        if pod.disruption:
            reason = pod.disruption[0]
        return PodEnd(Outcome.DISRUPTED, reason, f"the node stopped the pod ({reason})")
    if pod.phase == "Succeeded":
        return PodEnd(Outcome.SUCCEEDED, "Completed")
    if pod.disruption:
        return PodEnd(Outcome.TERMINATING, pod.disruption[0], pod.disruption[1])
    if pod.deleting_since is not None:
        return PodEnd(Outcome.TERMINATING, "PodDeleted", "being deleted")
    if pod.waiting_reason == "InvalidImageName":
        # A malformed image reference: no retry or wait can fix it, so it spends no failure budget.
        detail = f"{pod.waiting_message}; " if pod.waiting_message else ""
        return PodEnd(
            Outcome.PERMANENT, "InvalidImageName", f"{detail}spec.image is not a valid image reference"
        )
    waited = (now - pod.created).total_seconds() if pod.created else 0.0
    if pod.waiting_reason in IMAGE_PULL_REASONS and waited > start_timeout:
        return PodEnd(Outcome.FAILED, "ImagePull", f"image could not be pulled ({pod.waiting_reason})")
    if pod.waiting_reason in CONFIG_WAIT_REASONS and waited > start_timeout:
        return PodEnd(
            Outcome.FAILED, "ContainerConfig", f"container could not be created ({pod.waiting_reason})"
        )
    if pod.phase == "Running":
        return PodEnd(Outcome.RUNNING, "Running")
    return PodEnd(Outcome.PENDING, pod.waiting_reason or "Pending")
