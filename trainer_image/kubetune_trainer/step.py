"""One optimizer step: gradAccumulation micro-batches under autocast, the grad scaler, clipping, the
optimizer and scheduler update and the EMA update. Stateless itself: every state it touches is in the
checkpoint (the components) or in the batches it is handed."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kubetune_trainer import mixing
from kubetune_trainer import model as model_mod
from kubetune_trainer.components import Components
from kubetune_trainer.config import TrainingConfig
from kubetune_trainer.runtime import Runtime

Batch = tuple[torch.Tensor, torch.Tensor]


class StepRunner:
    def __init__(
        self,
        model: nn.Module,
        parts: Components,
        t: TrainingConfig,
        rt: Runtime,
        precision: str,
        num_classes: int,
    ):
        self.model, self.parts, self.t, self.rt, self.precision = model, parts, t, rt, precision
        self.device = torch.device(rt.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.mixer = mixing.build_mixer(t, num_classes, rt.rank)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def run(self, next_batch: Callable[[], Batch], step: int, epoch: int = 0) -> dict[str, float]:
        """Train step `step` (1-based: the step count after it) of `epoch` (0-based, for training.mixup's
        offEpoch); returns its `loss`, the `learning_rate` used (group 0's; `learning_rate/group<i>` too
        when the groups' rates differ, as with layerDecay) and, with training.gradClip, `grad_norm` (the
        total norm before clipping)."""
        t, p = self.t, self.parts
        p.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(t.gradAccumulation):
            x, y = next_batch()
            if self.mixer is not None:  # soft targets, seeded from (seed, step, micro, rank)
                x, y = self.mixer(x, y, epoch=epoch, step=step, micro=micro)
            x = x.contiguous(memory_format=model_mod.memory_format(t.channelsLast))  # a no-op when off
            last = micro == t.gradAccumulation - 1
            # Gradients are all-reduced once per step, on the last micro-batch.
            sync = contextlib.nullcontext() if last or not self.rt.distributed else self.model.no_sync()  # type: ignore[operator]
            with sync:
                with self.autocast():
                    loss = p.criterion(self.model(x), y) / t.gradAccumulation
                p.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        norm = None
        if t.gradClip:
            p.scaler.unscale_(p.optimizer)
            norm = nn.utils.clip_grad_norm_(self.trainable, t.gradClip)
        groups = p.optimizer.param_groups
        out = {"learning_rate": float(groups[0]["lr"])}
        if len({g["lr"] for g in groups}) > 1:  # not timm's equal-rate weight-decay groups
            out.update({f"learning_rate/group{i}": float(g["lr"]) for i, g in enumerate(groups)})
        p.scaler.step(p.optimizer)
        p.scaler.update()
        p.scheduler.step_update(step)
        if p.ema is not None:
            p.ema.update(model_mod.unwrap(self.model), step=step)  # type: ignore[operator]
        out["loss"] = float(loss_sum.item())
        if norm is not None:  # after loss.item(): that sync already waited for the norm
            out["grad_norm"] = float(norm)
        return out
