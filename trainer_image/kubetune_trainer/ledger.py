"""The resume ledger: what earlier attempts of this run left behind, and whether this attempt may continue it.

It reads `progress.json` (the step the last attempt reached, resumes, lost steps, the W&B step, whether the
run finished) and the newest valid checkpoint (rank 0 picks it, every rank loads the same one), checks
that the checkpoint belongs to the run the current spec describes (`config.resume_changes`: run-defining
fields, class names, training-set size, world size), and counts the steps an unannounced kill cost.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist

from kubetune_trainer.checkpoint import Checkpointer, Found, ProgressFile
from kubetune_trainer.config import ConfigError, JobConfig, resume_changes
from kubetune_trainer.evaluate import early_stop_reached
from kubetune_trainer.runtime import Runtime
from kubetune_trainer.telemetry import RunInfo

log = logging.getLogger(__name__)


def _from_rank0(rt: Runtime, value: Any) -> Any:
    """`value` as rank 0 has it, on every rank (the checkpoint volume may be rank 0's alone)."""
    if not rt.distributed:
        return value
    box: list[Any] = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


RECIPE_VERSION = 2
"""What the trainer does with a spec: 1 had one parameter group (weight decay on every parameter) and its
own LR schedule; 2 uses timm's optimizer param groups and schedulers. A checkpoint of another version
cannot continue here (its optimizer state does not fit, or the run would change meaning midway)."""


def trainer_versions() -> dict[str, Any]:
    """Recorded in every checkpoint: the recipe version and the timm release (its augmentation, mixup and
    optimizer code decide the numbers)."""
    import timm

    return {"recipe": RECIPE_VERSION, "timm": str(timm.__version__)}


def _version_mismatch(saved: dict[str, Any], cfg: JobConfig) -> str | None:
    fix = (
        "start a new run (a new metadata.name, or a new --checkpoint-dir), or resume with the trainer image "
        "that wrote the checkpoint (spec.image)"
    )
    recipe = saved.get("recipe", 1)
    if recipe != RECIPE_VERSION:
        return (
            f"image: the checkpoint was written by a trainer with training recipe v{recipe}, this one is "
            f"v{RECIPE_VERSION} (timm's optimizer param groups and schedulers); continuing would change the "
            f"run midway; {fix}"
        )
    now = trainer_versions()["timm"]
    if saved.get("timm") not in (None, now):
        what = f"timm {saved['timm']} wrote the checkpoint, this image has timm {now}"
        if cfg.data.augment is not None or cfg.training.mixup is not None:
            return (
                f"image: {what}; data.augment and training.mixup draw their randomness in timm's code; {fix}"
            )
        log.warning("%s: the resumed run may differ in its last bits from an uninterrupted one", what)
    return None


class ResumeLedger:
    """Progress across attempts; `open()` once at start, `write()` after every step (rank 0 writes)."""

    def __init__(self, root: Path, rt: Runtime, ckpt: Checkpointer) -> None:
        self.root, self.rt, self.ckpt = root, rt, ckpt
        self.file = ProgressFile(root / "progress.json")
        self.first_start = True
        self.finished = False
        """The checkpoint is the run's last step (or where it stopped early) and its model was exported:
        nothing left to do."""
        self.lost_now = 0
        self.lost_steps_total = 0
        self.resumes = 0
        self.wandb_step = -1
        self.run_id = ""
        self.checkpoint_path: str | None = None
        self.checkpoint_step: int | None = None

    def open(self, cfg: JobConfig, classes: list[str], train_size: int, total_steps: int) -> dict[str, Any]:
        """The checkpoint state to resume from ({} on a first start); ConfigError when it is another run's."""
        progress = _from_rank0(self.rt, self.file.read() if self.rt.rank == 0 else {})
        found: Found | None = _from_rank0(
            self.rt, self.ckpt.find_latest_valid() if self.rt.rank == 0 else None
        )
        self.first_start = not progress and found is None
        self.lost_steps_total = int(progress.get("lostStepsTotal", 0))
        self.resumes = int(progress.get("resumes", 0))
        self.wandb_step = int(progress.get("wandbStep", -1))
        state: dict[str, Any] = {}
        if found is not None:
            state = self.ckpt.load(found)
            self._check(state, cfg, classes, train_size, total_steps)
            self.ckpt.last_saved_step = found.step
            self.checkpoint_path, self.checkpoint_step = str(found.path), found.step
            # The last step, or an early stop (its patience is spent in the checkpointed metrics).
            ended = found.step == total_steps or early_stop_reached(
                state.get("metrics") or {}, cfg.training.earlyStopping
            )
            self.finished = (
                bool(progress.get("finished"))
                and ended
                and (self.root / "final" / "model.safetensors").is_file()
            )
        if progress and not self.finished:
            reached = int(progress.get("step", 0))
            self.lost_now = max(0, reached - int(state.get("step", 0)))
            self.lost_steps_total += self.lost_now
            self.resumes += 1
            log.info(
                "restart %d: last run reached step %d, resuming at %d: %d steps lost",
                self.resumes,
                reached,
                state.get("step", 0),
                self.lost_now,
            )
        self.run_id = self.rt.run_id or state.get("wandb_run_id") or progress.get("runId") or _new_run_id()
        return state

    def _check(
        self, state: dict[str, Any], cfg: JobConfig, classes: list[str], train_size: int, total: int
    ) -> None:
        why, applied = resume_changes(state["spec"], cfg)
        if why is None:
            why = _version_mismatch(state.get("trainer") or {}, cfg)
        if why is None and state["classes"] != classes:
            why = f"data.path: classes changed since the checkpoint ({state['classes']} -> {classes})"
        if why is None and state["train_size"] != train_size:
            why = (
                f"data.path: training set has {train_size} samples, the checkpoint was trained on "
                f"{state['train_size']}"
            )
        if why is None and state["world_size"] != self.rt.world_size:
            why = f"workers: checkpoint was written by {state['world_size']} processes, now {self.rt.world_size}"
        if why is None and state["step"] > total:
            field = "training.maxSteps" if cfg.training.maxSteps else "training.epochs"
            why = (
                f"{field}: the run is {total} steps long now, but its checkpoint is already at step "
                f"{state['step']}; set it to at least the checkpoint's step, or use a new --checkpoint-dir"
            )
        if why:
            raise ConfigError(why)
        for change in applied:
            log.info("resume applies a changed field: %s", change)

    def run_info(self, total_steps: int, start_step: int, spec: dict[str, Any], samples_done: int) -> RunInfo:
        """What telemetry backends need at start: the run's identity and totals across attempts."""
        return RunInfo(
            job=self.rt.job,
            namespace=self.rt.namespace,
            total_steps=total_steps,
            start_step=start_step,
            spec=spec,
            run_id=self.run_id,
            first_start=self.first_start,
            last_logged_step=self.wandb_step,
            samples_done=samples_done,
            resumes=self.resumes,
            lost_steps=self.lost_steps_total,
            extra={"checkpoint_step": self.checkpoint_step or 0, "dir": str(self.root)},
        )

    def write(self, step: int, total_steps: int, wandb_step: int, finished: bool = False) -> None:
        if self.rt.rank != 0:
            return
        doc = {
            "step": step,
            "totalSteps": total_steps,
            "checkpointStep": self.checkpoint_step,
            "runId": self.run_id,
            "wandbStep": max(self.wandb_step, wandb_step),
            "resumes": self.resumes,
            "lostStepsTotal": self.lost_steps_total,
            "finished": finished,
        }
        self.file.write(doc)

    def close(self) -> None:
        self.file.close()


def _new_run_id() -> str:
    return os.urandom(4).hex()
