"""How a run ended: the Outcome the loop returns, its exit code, and the termination message it becomes.

Standard library only: the CLI reports an outcome even when torch never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EXIT_CODES = {"Completed": 0, "Preempted": 143, "InvalidConfig": 2, "Error": 1}


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

    def termination_doc(self) -> dict[str, Any]:
        """The one JSON line of the termination log (the kubelet copies it into the pod's status)."""
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
        }
