"""Evaluation: loss, top-1 and top-5 over a strided shard of the validation set, summed across ranks, and
optionally a few misclassified samples (for TensorBoard's image grid)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from kubetune_trainer import data as data_mod
from kubetune_trainer.runtime import Runtime


class Sample(NamedTuple):
    image: torch.Tensor
    predicted: int
    target: int


@dataclass
class Misclassified:
    """Up to `limit` validation samples of this rank's shard the model got wrong, spread over the true
    classes (at most limit/classes per class while others are wrong too), chosen in evaluation order, so
    the same weights give the same samples. Inputs as the model saw them (normalised, float32, on the
    CPU). A limit of 0 collects nothing and costs nothing."""

    limit: int = 0
    chosen: list[Sample] = field(default_factory=list)
    spare: list[Sample] = field(default_factory=list)
    per_class: dict[int, int] = field(default_factory=dict)

    def add(self, x: torch.Tensor, predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
        if len(self.chosen) >= self.limit:
            return
        quota = math.ceil(self.limit / max(1, num_classes))
        wrong = (predicted != target).nonzero().flatten()
        for i, p, t in zip(wrong.tolist(), predicted[wrong].tolist(), target[wrong].tolist(), strict=True):
            if self.per_class.get(t, 0) < quota:
                self.per_class[t] = self.per_class.get(t, 0) + 1
                self.chosen.append(Sample(x[i].detach().float().cpu(), p, t))
                if len(self.chosen) >= self.limit:
                    return
            elif len(self.spare) < self.limit - len(self.chosen):
                self.spare.append(Sample(x[i].detach().float().cpu(), p, t))

    def samples(self) -> list[Sample]:
        """The chosen samples, topped up from the rest when few classes had errors; by true class."""
        picked = (self.chosen + self.spare)[: self.limit]
        return sorted(picked, key=lambda s: s.target)


@torch.no_grad()
def evaluate(
    net: nn.Module,
    dataset: Dataset[Any],
    rt: Runtime,
    batch_size: int,
    num_workers: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    misclassified: Misclassified | None = None,
) -> dict[str, float]:
    """{"eval_loss", "eval_top1", "eval_top5"}; every rank gets the same numbers. Leaves `net` in eval mode.

    `misclassified` (optional) collects up to its limit of wrongly classified samples of this rank."""
    net.eval()
    device = torch.device(rt.device)
    idx = data_mod.eval_indices(len(dataset), rt.rank, rt.world_size)  # type: ignore[arg-type]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    loader = data_mod.make_loader(dataset, batches, num_workers, 0)  # type: ignore[arg-type]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            out = net(x)
        k = min(5, out.shape[1])
        sums[0] += nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
        top = out.topk(k, dim=1).indices
        sums[1] += (top[:, 0] == y).sum()
        sums[2] += (top == y[:, None]).any(dim=1).sum()
        sums[3] += y.numel()
        if misclassified is not None:
            misclassified.add(x, top[:, 0], y, out.shape[1])
    if rt.distributed:
        dist.all_reduce(sums)
    n = max(1.0, float(sums[3]))
    return {"eval_loss": float(sums[0]) / n, "eval_top1": float(sums[1]) / n, "eval_top5": float(sums[2]) / n}
