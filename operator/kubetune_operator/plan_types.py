"""What the lifecycle's plan reads and returns: the observed job, the operator's settings, the plan, and
the `Draft` a plan is built in while its steps run (see `lifecycle`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from kubetune_operator import kueue, tensorboard
from kubetune_operator.api import FineTuneJob
from kubetune_operator.pods import PodView
from kubetune_operator.status import set_phase


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


# What the plan does next within one reconcile (see lifecycle._plan_training's loop).
Step = Literal["start", "start-quiet", "judge"]


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
    queue: kueue.QueueView | None = None  # set when the job is labelled for a Kueue LocalQueue

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
    workload_create: dict[str, Any] | None = None  # the Kueue Workload to create if absent
    workload_patch: dict[str, Any] | None = None  # a merge patch of the Workload's status
    workload_active: bool | None = None  # set the Workload's spec.active (False: runPolicy.suspend)
    queued_seconds: float | None = None  # metric: the wait in the LocalQueue that admission ended


@dataclass
class Draft:
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
    workload_create: dict[str, Any] | None = None
    workload_patch: dict[str, Any] | None = None
    workload_active: bool | None = None
    queued_seconds: float | None = None
    # The admitted flavors' node labels and tolerations, for the pods this plan creates.
    placement: kueue.Placement | None = None

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
            workload_create=self.workload_create,
            workload_patch=self.workload_patch,
            workload_active=self.workload_active,
            queued_seconds=self.queued_seconds,
        )


def mark(d: Draft, obs: Observed, phase: str, reason: str, message: str) -> None:
    """Set the drafted status's phase and the condition that says why."""
    set_phase(d.status, phase, reason, message, obs.now, obs.job.ref.generation)
