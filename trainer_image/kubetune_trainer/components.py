"""Builders of the training components a spec asks for: optimizer, LR schedule, grad scaler, EMA, loss.

Pure constructors of (spec, model, total steps); the loop owns their state and the checkpoint carries it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from kubetune_trainer import data as data_mod
from kubetune_trainer.config import ConfigError, TrainingConfig
from kubetune_trainer.runtime import Runtime

log = logging.getLogger(__name__)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate at `step` (a pure function, so resume needs no extra state)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if kind == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


class Schedule:
    """The learning-rate schedule as the loop drives it: step_update() after each optimizer update,
    step_eval() after each evaluation (plateau watches the eval metrics), state in the checkpoint."""

    def __init__(self, optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str) -> None:
        self._lambda = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, kind))

    def step_update(self, num_updates: int) -> None:
        """Set the learning rate for the update after `num_updates` updates."""
        self._lambda.step()

    def step_eval(self, metrics: dict[str, float]) -> None:
        """An evaluation's results (eval_loss, eval_top1, ...); only plateau uses them."""

    def state_dict(self) -> dict[str, object]:
        return self._lambda.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self._lambda.load_state_dict(state)


@dataclass
class Components:
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    criterion: nn.Module


def build_components(model: nn.Module, t: TrainingConfig, total_steps: int, precision: str) -> Components:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if t.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=t.learningRate, weight_decay=t.weightDecay)
    else:
        optimizer = torch.optim.SGD(
            params, lr=t.learningRate, momentum=0.9, nesterov=True, weight_decay=t.weightDecay
        )
    scheduler = Schedule(optimizer, total_steps, t.warmupSteps, t.scheduler)
    ema: nn.Module | None = None
    if t.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=0.9998, use_warmup=True)
    return Components(
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"),
        ema=ema,
        criterion=nn.CrossEntropyLoss(label_smoothing=t.labelSmoothing),
    )


def resolve_precision(precision: str, device_type: str) -> str:
    """training.precision on this device: auto is bf16 on CUDA, fp32 on CPU (mixed precision is CUDA-only)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision != "fp32" and device_type != "cuda":
        log.warning("training.precision %s needs CUDA; using fp32 on CPU", precision)
        return "fp32"
    return precision


def build_sampler(n_train: int, t: TrainingConfig, rt: Runtime) -> tuple[data_mod.ResumableBatchSampler, int]:
    """This rank's resumable sampler and the optimizer steps per epoch; ConfigError when an epoch has none."""
    sampler = data_mod.ResumableBatchSampler(n_train, t.batchSize, t.seed, rt.rank, rt.world_size)
    if sampler.batches_per_epoch == 0:
        raise ConfigError(
            f"training.batchSize: {t.batchSize} is larger than the training set per process "
            f"({n_train // rt.world_size} samples)"
        )
    steps = data_mod.steps_per_epoch(sampler.batches_per_epoch, t.gradAccumulation)
    if steps == 0:
        raise ConfigError(
            f"training.gradAccumulation: {t.gradAccumulation} micro-batches exceed the "
            f"{sampler.batches_per_epoch} batches of an epoch"
        )
    return sampler, steps
