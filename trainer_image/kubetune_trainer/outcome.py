"""How a run ended: the Outcome the loop returns, its exit code, and the termination message it becomes.

Standard library only: the CLI reports an outcome even when torch never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EXIT_CODES = {"Completed": 0, "EarlyStopped": 0, "Preempted": 143, "InvalidConfig": 2, "Error": 1}


@dataclass
class Outcome:
    """How the run ended; cli.py turns it into the exit code and the termination message."""

    reason: str
    exit_code: int
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    checkpoint: str | None = None
    checkpoint_step: int | None = None
    lost_steps: int = 0
    bad_images: int = 0
    message: str = ""
    eval: dict[str, float] | None = None
    """The latest evaluation: step, top1, top5, loss."""
    best_metric: float | None = None
    """checkpoint.best: the best value of best_metric_name so far, its model in best/ (from best_step)."""
    best_metric_name: str | None = None
    best_step: int | None = None

    def termination_doc(self) -> dict[str, Any]:
        """The one JSON line of the termination log (the kubelet copies it into the pod's status; it keeps
        4096 bytes, so every value here stays short). `eval` and the best* keys are null before the first
        evaluation and without checkpoint.best."""
        return {
            "reason": self.reason,
            "step": self.step,
            "totalSteps": self.total_steps,
            "epoch": self.epoch,
            "checkpoint": self.checkpoint,
            "checkpointStep": self.checkpoint_step,
            "lostSteps": self.lost_steps,
            "badImages": self.bad_images,
            "message": self.message,
            "eval": self.eval,
            "bestMetric": self.best_metric,
            "bestMetricName": self.best_metric_name,
            "bestStep": self.best_step,
        }
