"""Which pod serves a job's TensorBoard, and the TensorBoardReady condition: pure functions.

The Service `<job>-tensorboard` selects whichever pod carries the serving label, so
`kubectl port-forward svc/<job>-tensorboard 6006` works whichever pod serves:

- ReadWriteMany checkpoint claim: the standalone pod `<job>-tensorboard` mounts it read-only and serves
  all along, across attempts and after the end.
- ReadWriteOnce (or ReadWriteOncePod): a sidecar of the rank-0 trainer pod serves while an attempt runs;
  none between attempts; once the job ended and its trainer pods stopped, the standalone pod. A standalone
  pod while training would pin the claim to its node, which a rescheduled trainer may not get.

A serving pod that does not become ready within the start timeout is deleted and tried again after the
same time (at once when the spec changes), with the reason in the condition: never a pod pending forever.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from kubetune_operator import builders
from kubetune_operator.api import TENSORBOARD_PORT, FineTuneJob
from kubetune_operator.pods import PodView
from kubetune_operator.status import (
    FINISHED,
    drop_condition,
    get_condition,
    parse_time,
    set_condition,
)

CONDITION = "TensorBoardReady"
SHARED_MODES = ("ReadWriteMany",)
TERMINAL = ("Succeeded", "Failed")


@dataclass(frozen=True)
class ServerView:
    """The standalone TensorBoard pod as last seen."""

    name: str
    uid: str = ""
    phase: str = "Pending"
    ready: bool = False
    gone: bool = False
    deleting: bool = False
    created: datetime | None = None
    problem: str = ""  # why it is not running yet: the scheduler's or the kubelet's words


def server_view(pod: Mapping[str, Any], gone: bool = False) -> ServerView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    problem = ""
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False":
        problem = f"{scheduled.get('reason') or 'Unschedulable'}: {scheduled.get('message') or ''}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            problem = f"{waiting['reason']}: {waiting.get('message') or ''}"
    return ServerView(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        phase=status.get("phase") or "Pending",
        ready=(conditions.get("Ready") or {}).get("status") == "True",
        gone=gone,
        deleting=bool(meta.get("deletionTimestamp")),
        created=parse_time(meta.get("creationTimestamp")),
        problem=problem.strip().rstrip(":"),
    )


@dataclass
class BoardPlan:
    """What the TensorBoard part of a reconcile does; merged into the lifecycle's plan."""

    create: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    delete_services: list[str] = field(default_factory=list)
    requeue: list[float] = field(default_factory=list)


def own_claim_modes(job: FineTuneJob) -> tuple[str, ...]:
    """Access modes of the checkpoint claim the operator creates (ReadWriteMany for multi-worker jobs)."""
    pvc = builders.checkpoint_pvc(job)
    return tuple(pvc["spec"]["accessModes"]) if pvc is not None else ()


def involved(job: FineTuneJob, status: Mapping[str, Any]) -> bool:
    """Whether there is anything to serve or to clean up."""
    return job.spec.tensorboard.serve or get_condition(status, CONDITION) is not None


def sidecar_wanted(job: FineTuneJob, claim_modes: tuple[str, ...] | None) -> bool:
    """Rank 0 of new attempts gets the sidecar: serving on, and a claim only one node may mount."""
    return (
        job.spec.tensorboard.serve
        and claim_modes is not None
        and not any(m in SHARED_MODES for m in claim_modes)
    )


@dataclass(frozen=True)
class Inputs:
    """What the TensorBoard decision looks at, besides the job's new status."""

    job: FineTuneJob
    pods: Sequence[PodView]  # the trainer pods
    server: ServerView | None  # the standalone pod, if the watch has shown one
    claim_modes: tuple[str, ...] | None  # the checkpoint claim's access modes; None: claim not found
    now: datetime
    start_timeout: float  # seconds a serving pod may take to become ready
    started_attempt: int | None = None  # the attempt whose pods this reconcile creates
    error: str | None = None  # why creating the Service or the standalone pod failed last time


def plan(obs: Inputs, status: dict[str, Any]) -> BoardPlan:
    """Decide the TensorBoard objects for the job's new `status` (its phase already decided); sets or
    drops the TensorBoardReady condition in `status`."""
    job, out = obs.job, BoardPlan()
    name = builders.tensorboard_name(job.ref.name)
    live = obs.server if obs.server is not None and not obs.server.gone else None
    if not job.spec.tensorboard.serve:
        if live is not None and not live.deleting:
            out.delete_pods.append(name)
        if live is not None or get_condition(status, CONDITION) is not None:
            out.delete_services.append(name)
        drop_condition(status, CONDITION)
        return out
    if get_condition(status, CONDITION) is None:
        _ensure_service(job, out)
    if obs.claim_modes is None:
        claim = job.spec.checkpoint.existing_claim
        _condition(
            obs, status, False, "ClaimNotFound",
            f"PersistentVolumeClaim {claim!r} (spec.checkpoint.existingClaim) does not exist in namespace "
            f"{job.ref.namespace}: create it, or set spec.tensorboard.serve to false",
        )  # fmt: skip
        out.requeue.append(10.0)
        return out
    if obs.error is not None and _waiting_to_retry(obs, status, out, fresh="CreateFailed"):
        _condition(
            obs, status, False, "CreateFailed",
            f"could not create {obs.error}; tried again in {obs.start_timeout:.0f}s or when the spec "
            "changes (a ResourceQuota or LimitRange of the namespace?), or set spec.tensorboard.serve to "
            "false. Training is not affected.",
        )  # fmt: skip
        return out
    if obs.error is not None:
        _ensure_service(job, out)  # the retry: whatever failed is created again
    shared = any(m in SHARED_MODES for m in obs.claim_modes)
    stopped = all(p.gone or p.phase in TERMINAL for p in obs.pods)
    if shared or (status.get("phase") in FINISHED and stopped):
        _standalone(obs, status, live, out)
    else:
        if live is not None and not live.deleting:
            out.delete_pods.append(name)  # it must not hold a ReadWriteOnce claim a trainer needs
        _sidecar(obs, status, out)
    return out


def _ensure_service(job: FineTuneJob, out: BoardPlan) -> None:
    """Created with every serving pod (AlreadyExists is success), so one deleted by hand comes back."""
    svc = builders.tensorboard_service(job)
    if not any(
        o["kind"] == "Service" and o["metadata"]["name"] == svc["metadata"]["name"] for o in out.create
    ):
        out.create.append(svc)


def _waiting_to_retry(obs: Inputs, status: dict[str, Any], out: BoardPlan, fresh: str = "") -> bool:
    """After giving up (reason ServerNotStarting or CreateFailed) nothing is created for start_timeout
    seconds, unless the spec changed. `fresh`: a reason entered now (the timer starts)."""
    cond = get_condition(status, CONDITION) or {}
    reason = cond.get("reason")
    if fresh and reason != fresh:
        out.requeue.append(obs.start_timeout)
        return True
    if reason not in ("ServerNotStarting", "CreateFailed"):
        return False
    if cond.get("observedGeneration") != obs.job.ref.generation:
        return False
    since = parse_time(cond.get("lastTransitionTime")) or obs.now
    left = (since + timedelta(seconds=obs.start_timeout) - obs.now).total_seconds()
    if left > 0:
        out.requeue.append(left)
        return True
    return False


def _claim(job: FineTuneJob) -> str:
    return job.spec.checkpoint.existing_claim or builders.pvc_name(job.ref.name)


def _condition(obs: Inputs, status: dict[str, Any], value: bool, reason: str, message: str) -> None:
    set_condition(status, CONDITION, value, reason, message, obs.now, obs.job.ref.generation)


def _serving(obs: Inputs, pod: str) -> str:
    svc = builders.tensorboard_name(obs.job.ref.name)
    return (
        f"served by pod {pod}: kubectl port-forward -n {obs.job.ref.namespace} svc/{svc} "
        f"{TENSORBOARD_PORT}, then open http://localhost:{TENSORBOARD_PORT}"
    )


def _standalone(obs: Inputs, status: dict[str, Any], live: ServerView | None, out: BoardPlan) -> None:
    job, now = obs.job, obs.now
    name = builders.tensorboard_name(job.ref.name)
    if live is None:
        if _waiting_to_retry(obs, status, out):
            return
        pvc = builders.checkpoint_pvc(job)
        if pvc is not None:
            out.create.append(pvc)  # the first attempt may not have created it yet
        _ensure_service(job, out)
        out.create.append(builders.tensorboard_pod(job))
        _condition(obs, status, False, "Starting", f"starting pod {name}")
        return
    if live.deleting:
        return  # the watch shows it gone soon; then it is recreated
    if live.ready:
        _condition(obs, status, True, "Serving", _serving(obs, name))
        return
    waited = (now - live.created).total_seconds() if live.created else 0.0
    detail = f" ({live.problem})" if live.problem else ""
    if waited < obs.start_timeout:
        _condition(obs, status, False, "Starting", f"pod {name} is not ready yet{detail}")
        out.requeue.append(obs.start_timeout - waited + 1)
        return
    out.delete_pods.append(name)
    out.requeue.append(obs.start_timeout)
    _condition(
        obs, status, False, "ServerNotStarting",
        f"pod {name} was not ready within {obs.start_timeout:.0f}s{detail}, so it was deleted; it is tried "
        f"again in {obs.start_timeout:.0f}s or when the spec changes. It mounts PersistentVolumeClaim "
        f"{_claim(job)!r} read-only on a node without taints: check that the claim can be mounted there "
        f"(kubectl describe pod {name} while it runs), or set spec.tensorboard.serve to false. "
        "Training is not affected.",
    )  # fmt: skip


def _sidecar(obs: Inputs, status: dict[str, Any], out: BoardPlan) -> None:
    job = obs.job
    name = builders.tensorboard_name(job.ref.name)
    claim = _claim(job)
    if obs.started_attempt is not None:
        _ensure_service(job, out)
        first = builders.pod_name(job.ref.name, obs.started_attempt, 0)
        _condition(obs, status, False, "Starting", f"starting the tensorboard sidecar of pod {first}")
        return
    if status.get("phase") in FINISHED:
        _condition(
            obs, status, False, "WaitingForTrainerPods",
            f"the job ended: pod {name} serves once its trainer pods have stopped and released "
            f"ReadWriteOnce claim {claim!r}",
        )  # fmt: skip
        return
    attempt = int(status.get("attempt") or 0)
    rank0 = next((p for p in obs.pods if p.attempt == attempt and p.rank == 0 and not p.gone), None)
    if rank0 is not None and rank0.phase == "Running" and rank0.tensorboard:
        if rank0.tensorboard_ready:
            _condition(obs, status, True, "Serving", _serving(obs, rank0.name))
        else:
            _condition(
                obs, status, False, "SidecarNotReady",
                f"the tensorboard sidecar of pod {rank0.name} is not ready; if that lasts, see "
                f"kubectl logs -n {job.ref.namespace} {rank0.name} -c {builders.TENSORBOARD_CONTAINER} "
                f"(spec.image must have tensorboard on its PATH)",
            )  # fmt: skip
        return
    if rank0 is not None and not rank0.tensorboard and rank0.deleting_since is None:
        _condition(
            obs, status, False, "NoSidecar",
            f"pod {rank0.name} started before spec.tensorboard.serve was set, so it has no sidecar: the "
            f"next attempt's rank-0 pod serves, or pod {name} once the job ended",
        )  # fmt: skip
        return
    _condition(
        obs, status, False, "NotTraining",
        f"no trainer pod is running, and the checkpoint claim {claim!r} is ReadWriteOnce: the rank-0 "
        f"trainer pod serves while an attempt runs, pod {name} once the job ended, and no pod between "
        "attempts",
    )  # fmt: skip
