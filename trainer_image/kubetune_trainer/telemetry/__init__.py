"""Telemetry behind one interface: the loop calls these methods and never asks which backends are on.

`Telemetry` is the no-op default; the console progress, Prometheus, W&B and TensorBoard subclass it and
`Fanout` forwards to all of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune_trainer.evaluate import Misclassified

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """What backends need to know at start (the same on every restart of the job)."""

    job: str
    namespace: str
    total_steps: int
    start_step: int
    spec: dict[str, Any]
    run_id: str
    first_start: bool
    """True when no checkpoint or progress existed: W&B config is logged only then."""
    last_logged_step: int = -1
    """Highest step already sent to W&B by an earlier attempt; lower steps are not re-logged."""
    samples_done: int = 0
    resumes: int = 0
    lost_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelView:
    """What backends that look inside the model need: given once, right before start()."""

    model: Any
    """The module being trained (unwrapped from DDP; not the EMA copy). Backends read it, never change it."""
    image_size: int
    eval_cfg: dict[str, Any]
    """The eval transform's data config (`mean`, `std`, ...): how inputs were normalised."""
    classes: list[str]


class Telemetry:
    """No-op telemetry; backends override what they support."""

    def start(self, info: RunInfo) -> None:
        """Called once before the first step."""

    def watch(self, view: ModelView) -> None:
        """Once, right before start(): the model and its data, for backends that show weights or images."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step: loss, learning_rate, epoch, samples, samples_per_second; grad_norm
        (before clipping) when training.gradClip is on; learning_rate/group<i> when the parameter groups'
        learning rates differ (layerDecay)."""

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After an evaluation: eval_loss, eval_top1, eval_top5, eval_best_top1 (the best top-1 so far) and,
        with checkpoint.best, eval_best_metric and eval_best_step (the model in best/)."""

    @property
    def eval_samples_wanted(self) -> int:
        """How many misclassified validation samples log_eval_samples() wants (0: none are collected)."""
        return 0

    def log_eval_samples(self, step: int, samples: Misclassified) -> None:
        """After log_eval(): up to eval_samples_wanted misclassified validation samples."""

    def flush(self) -> None:
        """Before a checkpoint is written: what was logged so far reaches the disk, so a process killed
        after that checkpoint is durable leaves no gap in a per-step record the next attempt continues."""

    def checkpoint_saved(self, step: int, seconds: float) -> None:
        """After a checkpoint is durable (seconds = write time, or blocked time for async saves)."""

    def bad_images(self, count: int) -> None:
        """Images that failed to decode so far (train + val), each replaced by a seeded stand-in."""

    def preempting(self) -> None:
        """SIGTERM received: the run will stop after a checkpoint."""

    @property
    def last_logged_step(self) -> int:
        return -1

    def finish(self, exit_code: int) -> None:
        """Called on every exit path."""


class Fanout(Telemetry):
    """Forwards every call to each backend."""

    def __init__(self, backends: list[Telemetry]) -> None:
        self.backends = backends

    def start(self, info: RunInfo) -> None:
        for b in self.backends:
            b.start(info)

    def watch(self, view: ModelView) -> None:
        for b in self.backends:
            b.watch(view)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for b in self.backends:
            b.log_step(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        for b in self.backends:
            b.log_eval(step, metrics)

    @property
    def eval_samples_wanted(self) -> int:
        return max((b.eval_samples_wanted for b in self.backends), default=0)

    def log_eval_samples(self, step: int, samples: Misclassified) -> None:
        for b in self.backends:
            b.log_eval_samples(step, samples)

    def flush(self) -> None:
        for b in self.backends:
            b.flush()

    def checkpoint_saved(self, step: int, seconds: float) -> None:
        for b in self.backends:
            b.checkpoint_saved(step, seconds)

    def bad_images(self, count: int) -> None:
        for b in self.backends:
            b.bad_images(count)

    def preempting(self) -> None:
        for b in self.backends:
            b.preempting()

    @property
    def last_logged_step(self) -> int:
        return max((b.last_logged_step for b in self.backends), default=-1)

    def finish(self, exit_code: int) -> None:
        for b in self.backends:
            b.finish(exit_code)


def build(
    spec: Any, rank: int, log_every_seconds: float = 30.0, checkpoint_dir: Path | None = None
) -> Telemetry:
    """Backends for the spec; only rank 0 reports (one W&B run, one metrics endpoint, one TensorBoard
    record per job).

    `log_every_seconds` > 0 adds the console progress (a bar on a terminal, a line per interval in logs).
    TensorBoard (`spec.tensorboard.enabled`) writes to `<checkpoint_dir>/tensorboard/`; without a
    checkpoint_dir there is nowhere to keep one record across attempts, so it stays off.
    """
    if rank != 0:
        return Telemetry()
    backends: list[Telemetry] = []
    # TensorBoard first: its start (the event file, the graph at step 0) takes a moment that the progress
    # clock should not count.
    if spec.tensorboard.enabled and checkpoint_dir is not None:
        try:
            from kubetune_trainer.telemetry.tensorboard import TensorBoardTelemetry
        except ImportError as e:  # tensorboard is in the trainer extra; a bare torch install lacks it
            log.warning("TensorBoard off: %s (pip install 'tensorboard>=2.16')", e)
        else:
            backends.append(TensorBoardTelemetry(Path(checkpoint_dir) / "tensorboard"))
    if log_every_seconds > 0:
        from kubetune_trainer.telemetry.console import ConsoleTelemetry

        backends.append(ConsoleTelemetry(log_every_seconds))
    if spec.metrics.port:
        from kubetune_trainer.telemetry.prometheus import PrometheusTelemetry

        backends.append(PrometheusTelemetry(spec.metrics.port))
    if spec.wandb.mode != "disabled":
        from kubetune_trainer.telemetry.wandb import WandbTelemetry

        backends.append(WandbTelemetry(spec.wandb, spec.name))
    return Fanout(backends)
