"""Telemetry behind one interface: the loop calls these methods and never asks which backends are on.

`Telemetry` is the no-op default; Prometheus and W&B subclass it and `Fanout` forwards to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


class Telemetry:
    """No-op telemetry; backends override what they support."""

    def start(self, info: RunInfo) -> None:
        """Called once before the first step."""

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step: loss, learning_rate, epoch, samples, samples_per_second."""

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After an evaluation: eval_loss, eval_top1, eval_top5."""

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

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        for b in self.backends:
            b.log_step(step, metrics)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        for b in self.backends:
            b.log_eval(step, metrics)

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


def build(spec: Any, rank: int, log_every_seconds: float = 30.0) -> Telemetry:
    """Backends for the spec; only rank 0 reports (one W&B run, one metrics endpoint per job).

    `log_every_seconds` > 0 adds the console progress (a bar on a terminal, a line per interval in logs).
    """
    if rank != 0:
        return Telemetry()
    backends: list[Telemetry] = []
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
