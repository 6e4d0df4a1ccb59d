"""Throughput of the kubetune trainer (checkpoint every 50 steps, /metrics served, W&B offline, TensorBoard
event files, the console progress) over a bare PyTorch loop of the same model, data and batch size,
measured alternately (step by step) in one process.

Key `ratio` = kubetune steps/s / bare steps/s (target >= 0.97). Keys `augment_*`: the same with random
augmentation on both sides (timm_baseline.RECOMMENDED_AUGMENT: RandAugment, random resized crop, random
erasing) on a JPEG folder: kubetune's data.augment (each sample's draws seeded from (seed, epoch, index))
against timm's create_transform(is_training=True) with the same settings in a plain DataLoader. Steady state only: the first WARMUP steps are
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


def _spec(steps: int, images: Path | None = None) -> dict[str, Any]:
    if images is not None:
        from bench.timm_baseline import RECOMMENDED_AUGMENT

        data = {"path": str(images), "imageSize": IMAGE, "numWorkers": 0, "augment": RECOMMENDED_AUGMENT}
        return _spec(steps) | {"data": data}
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

    def __init__(self, images: Path | None = None) -> None:
        import timm
        import torch
        from torch.utils.data import DataLoader, Dataset

        from kubetune_trainer.data import SyntheticDataset

        self.torch = torch
        self.model = timm.create_model(MODEL, num_classes=10).train()
        data: Dataset[Any] = SyntheticDataset(list(range(BATCH * (STEPS + 2))), 10, IMAGE, 0)
        if images is not None:  # timm's own training transform with the same settings
            from timm.data import ImageDataset, create_transform, resolve_model_data_config

            from bench.timm_baseline import RECOMMENDED_AUGMENT, timm_augment_kwargs

            cfg = resolve_model_data_config(self.model) | {"input_size": (3, IMAGE, IMAGE)}
            transform = create_transform(is_training=True, **timm_augment_kwargs(RECOMMENDED_AUGMENT, cfg))
            data = ImageDataset(str(images / "train"), transform=transform)
        self.batches = iter(DataLoader(data, batch_size=BATCH, shuffle=True, drop_last=True))
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


def paired_round(workdir: Path, images: Path | None = None) -> tuple[float, float]:
    """One kubetune step, one bare step, alternately (ABBA), so bursts of machine load hit both sides alike.
    Returns (kubetune steps/s, bare steps/s) over the steady-state window."""
    from kubetune_trainer import loop
    from kubetune_trainer.config import parse_spec

    trainer = loop.Trainer(parse_spec(_spec(STEPS, images), name="bench"), workdir, loop.Runtime())
    bare = BareLoop(images)
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
    from bench.timm_baseline import patch_posterize_bits0, write_image_folder

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("WANDB_DIR", tmp)
        os.environ.setdefault("WANDB_SILENT", "true")
        shim = patch_posterize_bits0()  # timm's side would crash on it; kubetune redraws (both alike here)
        images = write_image_folder(Path(tmp) / "jpegs" / "train", 10, BATCH * (STEPS + 2) // 10, 48).parent
        write_image_folder(images / "val", 10, 4, 48, seed=1)
        bare, kt, aug_bare, aug_kt = [], [], [], []
        for i in range(ROUNDS):  # plain and augmented rounds interleaved: load swings hit both
            k, b = paired_round(Path(tmp) / f"run{i}")
            kt.append(k)
            bare.append(b)
            k, b = paired_round(Path(tmp) / f"aug{i}", images)
            aug_kt.append(k)
            aug_bare.append(b)
    ratios = [k / b for k, b in zip(kt, bare, strict=True)]
    aug_ratios = [k / b for k, b in zip(aug_kt, aug_bare, strict=True)]
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
        "augment_bare_steps_per_second": statistics.median(aug_bare),
        "augment_kubetune_steps_per_second": statistics.median(aug_kt),
        "augment_ratio": statistics.median(aug_ratios),
        "augment_ratios": aug_ratios,
        "augment_posterize_bits0_shim": shim,
    }


if __name__ == "__main__":
    print(run())
