"""Throughput of the kubetune trainer (checkpoint every 50 steps, /metrics served, W&B offline, TensorBoard
event files, the console progress) over a bare PyTorch loop of the same model, data and batch size,
measured alternately (step by step) in one process.

Key `ratio` = kubetune steps/s / bare steps/s (target >= 0.97). Steady state only: the first WARMUP steps are
excluded; checkpoint stalls inside the window are included. Caveat: the background checkpoint write may
overlap a bare step as well as kubetune's own steps, so part of its CPU cost lands on the bare side.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL, IMAGE, BATCH, STEPS, WARMUP, ROUNDS, EVERY = "resnet18", 32, 32, 80, 10, 3, 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spec(steps: int) -> dict[str, Any]:
    return {
        "model": {"name": MODEL},
        "data": {
            "format": "synthetic",
            "imageSize": IMAGE,
            "syntheticSamples": BATCH * (steps + 2),
            "numWorkers": 0,
            "valFraction": 0.01,
        },
        "training": {"maxSteps": steps, "batchSize": BATCH},
        "checkpoint": {"everySteps": EVERY},
        "wandb": {"mode": "offline", "project": "kubetune-bench"},
        "metrics": {"port": _free_port()},
        "tensorboard": {"enabled": True},  # to <workdir>/tensorboard/, histograms and images at the eval
    }


class BareLoop:
    """What a user would write by hand: same timm model, same synthetic data, AdamW + cosine, no checkpoints."""

    def __init__(self) -> None:
        import timm
        import torch
        from torch.utils.data import DataLoader

        from kubetune_trainer.data import SyntheticDataset

        self.torch = torch
        data = SyntheticDataset(list(range(BATCH * (STEPS + 2))), 10, IMAGE, 0)
        self.batches = iter(DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True))
        self.model = timm.create_model(MODEL, num_classes=10).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, STEPS)

    def step(self) -> None:
        x, y = next(self.batches)
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        self.sched.step()
        loss.item()


def paired_round(workdir: Path) -> tuple[float, float]:
    """One kubetune step, one bare step, alternately (ABBA), so bursts of machine load hit both sides alike.
    Returns (kubetune steps/s, bare steps/s) over the steady-state window."""
    from kubetune_trainer import loop
    from kubetune_trainer.config import parse_spec

    trainer = loop.Trainer(parse_spec(_spec(STEPS), name="bench"), workdir, loop.Runtime())
    bare = BareLoop()
    steps = trainer.steps()
    kt_times, bare_times = [], []
    for i in range(STEPS):
        # ABBA order: whichever side runs second in a pair may pay for the first one's cache footprint.
        for side in ("kt", "bare") if i % 2 == 0 else ("bare", "kt"):
            t0 = time.perf_counter()
            if side == "kt":
                next(steps)  # includes the previous step's boundary work: poll, async save start
                kt_times.append(time.perf_counter() - t0)
            else:
                bare.step()
                bare_times.append(time.perf_counter() - t0)
    for _ in steps:  # finish: final eval, final checkpoint, export (not timed)
        pass
    trainer.close(0)
    return (STEPS - WARMUP) / sum(kt_times[WARMUP:]), (STEPS - WARMUP) / sum(bare_times[WARMUP:])


def run() -> dict[str, Any]:
    import logging

    logging.getLogger("kubetune_trainer").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        os.environ.setdefault("WANDB_SILENT", "true")
        bare, kt = [], []
        for i in range(ROUNDS):
            k, b = paired_round(Path(tmp) / f"run{i}")
            kt.append(k)
            bare.append(b)
    ratios = [k / b for k, b in zip(kt, bare, strict=True)]
    return {
        "model": MODEL,
        "image_size": IMAGE,
        "batch_size": BATCH,
        "steps": STEPS,
        "checkpoint_every_steps": EVERY,
        "bare_steps_per_second": statistics.median(bare),
        "kubetune_steps_per_second": statistics.median(kt),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "target": ">= 0.97",
    }


if __name__ == "__main__":
    print(run())
