"""Evaluation: loss, top-1 and top-5 over a strided shard of the validation set, summed across ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from kubetune_trainer import data as data_mod
from kubetune_trainer.runtime import Runtime


@torch.no_grad()
def evaluate(
    net: nn.Module,
    dataset: Dataset[Any],
    rt: Runtime,
    batch_size: int,
    num_workers: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
) -> dict[str, float]:
    """{"eval_loss", "eval_top1", "eval_top5"}; every rank gets the same numbers. Leaves `net` in eval mode."""
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
    if rt.distributed:
        dist.all_reduce(sums)
    n = max(1.0, float(sums[3]))
    return {"eval_loss": float(sums[0]) / n, "eval_top1": float(sums[1]) / n, "eval_top5": float(sums[2]) / n}
