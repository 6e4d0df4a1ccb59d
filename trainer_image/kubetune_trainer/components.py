"""Builders of the training components a spec asks for: optimizer, LR schedule, grad scaler, EMA, loss.

Pure constructors of (spec, model, total steps); the loop owns their state and the checkpoint carries it.
The optimizer and the schedule are timm's (create_optimizer_v2, create_scheduler_v2); `Schedule` keeps
only the schedule's dynamic state in the checkpoint, so a resume may stretch it to a new total.
"""

from __future__ import annotations

import difflib
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kubetune_trainer import data as data_mod
from kubetune_trainer import mixing
from kubetune_trainer.config import ConfigError, TrainingConfig
from kubetune_trainer.runtime import Runtime

log = logging.getLogger(__name__)


STEP_MILESTONES = (0.5, 0.75)
"""Where scheduler step (and multistep) multiplies the rate by DECAY_RATE: shares of the post-warmup updates."""
DECAY_RATE = 0.1
PLATEAU_PATIENCE = 10
"""Evaluations without improvement of eval_loss that plateau tolerates; the next one cuts the rate."""
POLY_POWER = 0.5
"""Exponent of scheduler poly (timm PolyLRScheduler's own default)."""
_PLATEAU_STATE = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch", "_last_lr")
"""What ReduceLROnPlateau learns from the evaluations (timm's PlateauLRScheduler.state_dict keeps only
best and last_epoch, so a resume would restart its patience)."""


def check_optimizer(name: str) -> None:
    """ConfigError (exit 2) unless timm can build optimizer `name` here: a name in
    timm.optim.list_optimizers(), optionally as lookahead_<name>, whose class imports on this machine.
    Cheap, so the trainer calls it before it reads any data."""
    from timm.optim import get_optimizer_class, get_optimizer_info, list_optimizers

    known = [str(n) for n in list_optimizers()]
    # timm reads only the last "_" part as the name (x_adamw would silently be adamw); lookahead_ is the
    # one prefix it understands.
    base = name.removeprefix("lookahead_")
    if base not in known:
        close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ConfigError(
            f"training.optimizer: {name!r} is not a timm optimizer{hint} (all: timm.optim.list_optimizers())"
        )
    try:
        get_optimizer_class(base, bind_defaults=False)
    except (ImportError, AssertionError) as e:  # apex and bitsandbytes ones: a missing package or no CUDA
        raise ConfigError(f"training.optimizer: {name} cannot be used here: {e}") from e
    if get_optimizer_info(base).second_order:
        raise ConfigError(
            f"training.optimizer: {name} is a second-order optimizer (it needs backward(create_graph=True)), "
            "which the trainer's step does not do; choose a first-order one such as adamw, lamb or sgd"
        )


def check_optimizer_args(t: TrainingConfig) -> None:
    """ConfigError when training.betas or training.eps is set for an optimizer without them (timm would
    drop the value without a word)."""
    from timm.optim import get_optimizer_info

    info = get_optimizer_info(t.optimizer.removeprefix("lookahead_"))
    if t.betas is not None and not info.has_betas:
        raise ConfigError(f"training.betas: {t.optimizer} has no betas; remove training.betas")
    if t.betas is not None and len(t.betas) != info.num_betas:
        raise ConfigError(f"training.betas: {t.optimizer} takes {info.num_betas} betas, got {list(t.betas)}")
    if t.eps is not None and not info.has_eps:
        raise ConfigError(f"training.eps: {t.optimizer} has no epsilon; remove training.eps")


def build_optimizer(model: nn.Module, t: TrainingConfig) -> torch.optim.Optimizer:
    """training.optimizer from timm's create_optimizer_v2 on the (eager, unwrapped) model.

    Weight decay skips 1-d parameters (norms, biases) and the model's no_weight_decay(); layerDecay makes
    one group per layer with an lr_scale, which the timm scheduler applies; frozen parameters are left out
    (timm's param-group builders skip requires_grad False). betas and eps are passed only when set.
    """
    from timm.optim import create_optimizer_v2

    check_optimizer(t.optimizer)
    check_optimizer_args(t)
    extra: dict[str, Any] = {}
    if t.betas is not None:
        extra["betas"] = tuple(t.betas)
    if t.eps is not None:
        extra["eps"] = t.eps
    optimizer: torch.optim.Optimizer = create_optimizer_v2(
        model,
        opt=t.optimizer,
        lr=t.learningRate,
        weight_decay=t.weightDecay,
        momentum=t.momentum,
        filter_bias_and_bn=True,
        layer_decay=t.layerDecay,
        **extra,
    )
    return optimizer


def warmup_steps(t: TrainingConfig, steps_per_epoch: int) -> int:
    """training.warmupSteps, or warmupEpochs in optimizer steps (rounded up: a set warmup is >= 1 step)."""
    if t.warmupEpochs:
        return max(1, math.ceil(round(t.warmupEpochs * steps_per_epoch, 6)))
    return t.warmupSteps


class Schedule:
    """The learning-rate schedule as the loop drives it: step_update() after each optimizer update,
    step_eval() after each evaluation (plateau watches the eval metrics), state in the checkpoint.

    A timm scheduler counted in optimizer updates: the warmup is a prefix (linear from
    warmupLearningRate, the peak at update `warmup`), and the decay spans the `total - warmup` updates
    after it. Apart from plateau the rate is a function of the update count, so the state is that count
    (plateau adds what it learned from the evaluations and its current rates), never the totals: a resume
    with a larger training.epochs/maxSteps builds the longer schedule and continues it at the same count.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, t: TrainingConfig, total: int, warmup: int) -> None:
        from timm.scheduler import create_scheduler_v2

        self.kind, self.warmup, self.num_updates = t.scheduler, warmup, 0
        self._optimizer = optimizer
        common: dict[str, Any] = {
            "min_lr": t.minLearningRate,
            "warmup_lr": t.warmupLearningRate,
            "warmup_epochs": warmup,
        }
        if self.kind == "plateau":
            # timm deprecates it because it does not checkpoint the plateau state; state_dict() here does.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "PlateauLRScheduler is deprecated", FutureWarning)
                self._sched, _ = create_scheduler_v2(
                    optimizer,
                    "plateau",
                    decay_rate=DECAY_RATE,
                    patience_epochs=PLATEAU_PATIENCE,
                    plateau_mode="min",
                    **common,
                )
        else:
            decay = max(1, total - warmup)
            # timm's multistep applies milestone m from t = m - 1 on (MultiStepLRScheduler
            # get_curr_decay_steps), so m - 1 is the first post-warmup update at or past the share.
            milestones = [math.ceil(share * decay) + 1 for share in STEP_MILESTONES]
            self._sched, _ = create_scheduler_v2(
                optimizer,
                "multistep" if self.kind == "step" else self.kind,
                num_epochs=decay,
                decay_milestones=milestones,
                decay_rate=POLY_POWER if self.kind == "poly" else DECAY_RATE,
                warmup_prefix=True,
                step_on_epochs=False,  # t counts optimizer updates
                updates_per_epoch=1,
                **common,
            )
        self.step_update(0)

    def step_update(self, num_updates: int) -> None:
        """Set the learning rate for the update after `num_updates` updates."""
        self.num_updates = num_updates
        if self.kind != "plateau":
            self._sched.step_update(num_updates)
        elif self.warmup and num_updates <= self.warmup:
            self._sched.step(num_updates)  # plateau's warmup; after it only evaluations move the rate

    def step_eval(self, metrics: dict[str, float]) -> None:
        """An evaluation's results (eval_loss, eval_top1, ...); only plateau uses them (eval_loss, after
        the warmup, as timm's PlateauLRScheduler.step does)."""
        if self.kind == "plateau" and "eval_loss" in metrics and self.num_updates > self.warmup:
            self._sched.step(self.num_updates, float(metrics["eval_loss"]))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"num_updates": self.num_updates}
        if self.kind == "plateau":
            inner = self._sched.lr_scheduler
            state["plateau"] = {k: getattr(inner, k) for k in _PLATEAU_STATE}
            state["lrs"] = [float(g["lr"]) for g in self._optimizer.param_groups]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved update count under this (possibly longer) schedule."""
        # Checkpoints from before the timm schedule hold LambdaLR's state: its last_epoch is the count.
        n = int(state.get("num_updates", state.get("last_epoch", 0)))
        if self.kind == "plateau" and "plateau" in state:
            inner = self._sched.lr_scheduler
            for key in _PLATEAU_STATE:
                if key in state["plateau"]:
                    setattr(inner, key, state["plateau"][key])
            if n > self.warmup:
                for group, lr in zip(self._optimizer.param_groups, state["lrs"], strict=True):
                    group["lr"] = lr
        self.step_update(n)


@dataclass
class Components:
    optimizer: torch.optim.Optimizer
    scheduler: Schedule
    scaler: torch.amp.GradScaler
    ema: nn.Module | None
    criterion: nn.Module


def build_components(
    model: nn.Module, t: TrainingConfig, total_steps: int, precision: str, steps_per_epoch: int
) -> Components:
    """The parts for the eager, unwrapped `model` (before DDP and torch.compile, so timm sees its layer
    names); `steps_per_epoch` converts training.warmupEpochs to steps."""
    optimizer = build_optimizer(model, t)
    scheduler = Schedule(optimizer, t, total_steps, warmup_steps(t, steps_per_epoch))
    ema: nn.Module | None = None
    if t.ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=t.emaDecay, use_warmup=True)
    return Components(
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=precision == "fp16"),
        ema=ema,
        criterion=mixing.training_criterion(t),
    )


def resolve_precision(precision: str, device_type: str) -> str:
    """training.precision on this device: auto is bf16 on CUDA, fp32 on CPU (mixed precision is CUDA-only)."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if precision != "fp32" and device_type != "cuda":
        log.warning("training.precision %s needs CUDA; using fp32 on CPU", precision)
        return "fp32"
    return precision


def build_sampler(
    train: Dataset[Any], sampling: str, t: TrainingConfig, rt: Runtime
) -> tuple[data_mod.ResumableBatchSampler, int]:
    """This rank's resumable sampler (data.sampling over the train split's labels) and the optimizer steps
    per epoch; ConfigError when an epoch has none."""
    sampler = data_mod.make_batch_sampler(
        sampling, data_mod.dataset_labels(train), t.batchSize, t.seed, rt.rank, rt.world_size
    )
    n_train = sampler.n
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
