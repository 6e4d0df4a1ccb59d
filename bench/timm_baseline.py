"""kubetune next to timm's own checkpoint/resume semantics, on the same model, data and batch size.

timm's train.py is not in the pip package, so this reproduces what it does with the same timm utilities:
`timm.utils.CheckpointSaver.save_checkpoint` at each epoch end (last.pth.tar; model, optimizer, epoch) and, on
restart, `timm.models.resume_checkpoint` then continue at the returned epoch. No scheduler, sampler or RNG
state is restored. A kill mid-epoch is simulated in-process by dropping every object (as SIGKILL would) and
rebuilding from the checkpoint file. kubetune's lost steps come from real SIGTERM/SIGKILL of `kubetune-train`
(bench/preemption_lost_steps.py) and its throughput from the trainer driven in-process.

Augmentation (keys `augment_*`): kubetune with data.augment = RECOMMENDED_AUGMENT against timm's own loader
(`timm.data.create_loader(is_training=True)`, i.e. create_transform with the same settings, no prefetcher)
on the same generated JPEG folder, step by step alternately; `augment_throughput_ratio` = kubetune steps/s
/ timm steps/s (target >= 0.97). `augment_applied` says whether the trainer's training split really ran a
random transform (false until data.augment is implemented: the ratio then compares against no augmentation).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

MODEL, IMAGE, BATCH, SAMPLES, EPOCHS, KILL_EPOCH, KILL_BATCH = "test_resnet", 32, 16, 256, 4, 2, 9
AUG_STEPS, AUG_WARMUP, AUG_PER_CLASS, AUG_SOURCE_SIZE = 40, 4, 70, 48

RECOMMENDED_AUGMENT: dict[str, Any] = {
    "autoAugment": "rand-m9-mstd0.5-inc1",
    "scale": [0.6, 1.0],
    "reprob": 0.25,
    "hflip": 0.0,
}
"""data.augment preset the docs recommend (hflip 0: fine for most data, and required for digits/text)."""


def timm_augment_kwargs(augment: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm create_transform/create_loader(is_training=True) keywords for a data.augment spec (camelCase,
    unset fields at their declared defaults) at the model's input_size, interpolation, mean and std."""
    from kubetune_trainer.config import AugmentConfig
    from kubetune_trainer.fields import default_of

    a = {f.name: default_of(f) for f in dataclasses.fields(AugmentConfig)} | dict(augment)
    return {
        "input_size": tuple(data_cfg["input_size"]),
        "scale": tuple(a["scale"]),
        "ratio": tuple(a["ratio"]),
        "hflip": a["hflip"],
        "vflip": a["vflip"],
        "color_jitter": a["colorJitter"] or None,  # timm skips it with an auto-augment policy anyway
        "auto_augment": a["autoAugment"],
        "interpolation": a["interpolation"] or data_cfg["interpolation"],
        "mean": tuple(data_cfg["mean"]),
        "std": tuple(data_cfg["std"]),
        "re_prob": a["reprob"],
        "re_mode": a["remode"],
        "re_count": a["recount"],
    }


def patch_posterize_bits0() -> bool:
    """Make timm's posterize give Pillow < 13's result for bits=0 (a black image) instead of raising.

    timm's RandAugment "inc1" maps a magnitude clipped at 10 to posterize(bits=0); Pillow 13 raises
    ValueError for it (about 1 sample in 2000 with RECOMMENDED_AUGMENT), which would end a throughput
    run. Patched in-process only, for both sides alike; returns whether the patch was needed.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("L", (1, 1)), 0)
        return False
    except ValueError:
        pass
    original = auto_augment.posterize

    def posterize(img: Any, bits_to_keep: int, **kw: Any) -> Any:
        return Image.new(img.mode, img.size) if bits_to_keep < 1 else original(img, bits_to_keep, **kw)

    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is original:
            auto_augment.NAME_TO_OP[name] = posterize
    return True


def write_image_folder(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """<root>/<class>/<i>.jpg: smooth random colour fields tinted per class (JPEG, so loading decodes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = np.array([c * 25 % 256, (c * 85) % 256, (255 - c * 25) % 256], dtype=np.float32)
        for i in range(per_class):
            small = rng.integers(0, 256, (6, 6, 3)).astype(np.float32) * 0.6 + tint * 0.4
            img = Image.fromarray(small.astype(np.uint8), mode="RGB").resize(
                (size, size), Image.Resampling.BICUBIC
            )
            img.save(folder / f"{i:05d}.jpg", quality=90)
    return root


class TimmStyle:
    """A train.py-shaped loop: seeded once, shuffled DataLoader, cosine per epoch, validate + checkpoint per epoch."""

    def __init__(self, out: Path) -> None:
        import timm
        import torch
        from timm.utils import CheckpointSaver
        from torch.utils.data import DataLoader

        from kubetune_trainer.data import SyntheticDataset, seeded_split

        torch.manual_seed(0)
        self.torch = torch
        train_idx, val_idx = seeded_split(SAMPLES, 0.1, 0)
        self.loader = DataLoader(
            SyntheticDataset(train_idx, 10, IMAGE, 0), batch_size=BATCH, shuffle=True, drop_last=True
        )
        self.val_loader = DataLoader(SyntheticDataset(val_idx, 10, IMAGE, 0), batch_size=BATCH)
        self.model = timm.create_model(MODEL, num_classes=10).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, EPOCHS)
        out.mkdir(parents=True, exist_ok=True)
        self.saver = CheckpointSaver(
            self.model, self.opt, checkpoint_dir=str(out), recovery_dir=str(out), max_history=2
        )
        self.out = out
        self.start_epoch = 0

    def resume(self) -> None:
        from timm.models import resume_checkpoint

        self.start_epoch = (
            resume_checkpoint(self.model, str(self.out / "last.pth.tar"), self.opt, log_info=False) or 0
        )
        for _ in range(self.start_epoch):
            self.sched.step()  # train.py steps the scheduler to start_epoch; it saves no scheduler state

    def steps(self, kill_at: tuple[int, int] | None = None) -> Iterator[int]:
        """Yield after each optimizer step; stop at (epoch, batch) without saving (the kill)."""
        for epoch in range(self.start_epoch, EPOCHS):
            for batch, (x, y) in enumerate(self.loader):
                if kill_at == (epoch, batch):
                    return
                self.opt.zero_grad(set_to_none=True)
                self.torch.nn.functional.cross_entropy(self.model(x), y).backward()
                self.opt.step()
                yield batch
            self.sched.step()
            self.saver.save_checkpoint(epoch, metric=self.validate())

    def validate(self) -> float:
        """train.py validates every epoch (its metric picks the best checkpoint); kubetune does too."""
        self.model.eval()
        correct = total = 0
        with self.torch.no_grad():
            for x, y in self.val_loader:
                correct += int((self.model(x).argmax(1) == y).sum())
                total += len(y)
        self.model.train()
        return correct / max(1, total)

    def weights(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def paired_throughput(workdir: Path) -> tuple[float, float]:
    """(timm-style steps/s, kubetune steps/s): one step of each alternately, so machine load hits both alike.
    Step time includes data loading and each side's checkpointing (timm: per epoch; kubetune: every 10)."""
    from kubetune_trainer import loop
    from kubetune_trainer.config import parse_spec

    spec = {
        "model": {"name": MODEL},
        "data": {"format": "synthetic", "imageSize": IMAGE, "syntheticSamples": SAMPLES, "numWorkers": 0},
        "training": {"epochs": EPOCHS, "batchSize": BATCH},
        "checkpoint": {"everySteps": 10},
        "metrics": {"port": 0},
    }
    trainer = loop.Trainer(parse_spec(spec, name="bench"), workdir / "kubetune", loop.Runtime())
    timm_style = TimmStyle(workdir / "timm")
    kt_steps, timm_steps = trainer.steps(), timm_style.steps()
    kt_times, timm_times = [], []
    while True:
        t0 = time.perf_counter()
        a = next(timm_steps, None)
        t1 = time.perf_counter()
        b = next(kt_steps, None)
        t2 = time.perf_counter()
        if a is None or b is None:
            break
        timm_times.append(t1 - t0)
        kt_times.append(t2 - t1)
    for _ in kt_steps:
        pass
    trainer.close(0)
    return len(timm_times) / sum(timm_times), len(kt_times) / sum(kt_times)


def paired_steps(
    a: Callable[[], object], b: Callable[[], object], steps: int, warmup: int
) -> tuple[float, float]:
    """(a steps/s, b steps/s) over steps after `warmup`, alternating ABBA so load bursts hit both alike."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(steps):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            (a if side == 0 else b)()
            times[side].append(time.perf_counter() - t0)
    return tuple((steps - warmup) / sum(times[s][warmup:]) for s in (0, 1))  # type: ignore[return-value]


def augmented_throughput(workdir: Path) -> dict[str, Any]:
    """kubetune with RECOMMENDED_AUGMENT vs timm's create_loader(is_training=True) with the same settings:
    same model, JPEG folder, batch size, AdamW; kubetune checkpoints every 10 steps, timm per epoch (none
    inside the window). Both load in-process (numWorkers 0), within one epoch."""
    import timm
    import torch
    from timm.data import ImageDataset, create_loader, resolve_model_data_config

    from kubetune_trainer import loop
    from kubetune_trainer.config import parse_spec

    shim = patch_posterize_bits0()  # before either side builds its transform
    root = workdir / "jpegs"
    write_image_folder(root / "train", 10, AUG_PER_CLASS, AUG_SOURCE_SIZE)
    write_image_folder(root / "val", 10, 2, AUG_SOURCE_SIZE, seed=1)
    spec = {
        "model": {"name": MODEL},
        "data": {"path": str(root), "imageSize": IMAGE, "numWorkers": 0, "augment": RECOMMENDED_AUGMENT},
        "training": {"maxSteps": AUG_STEPS, "batchSize": BATCH},
        "checkpoint": {"everySteps": 10},
        "metrics": {"port": 0},
    }
    trainer = loop.Trainer(parse_spec(spec, name="bench-augment"), workdir / "kt-augment", loop.Runtime())
    applied = bool(getattr(trainer.data.train, "augmented", False))
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=10).train()
    data_cfg = resolve_model_data_config(model) | {"input_size": (3, IMAGE, IMAGE)}
    kwargs = timm_augment_kwargs(RECOMMENDED_AUGMENT, data_cfg)
    loader = create_loader(
        ImageDataset(str(root / "train")),
        batch_size=BATCH,
        is_training=True,
        use_prefetcher=False,
        num_workers=0,
        persistent_workers=False,
        **kwargs,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    batches = iter(loader)

    def timm_step() -> None:
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    kt_steps = trainer.steps()
    kt_sps, timm_sps = paired_steps(lambda: next(kt_steps), timm_step, AUG_STEPS, AUG_WARMUP)
    for _ in kt_steps:
        pass
    trainer.close(0)
    return {
        "augment_preset": ", ".join(f"{k}={v}" for k, v in RECOMMENDED_AUGMENT.items()),
        "augment_applied": applied,
        "augment_posterize_bits0_shim": shim,
        "augment_timm_transform": ", ".join(f"{k}={v}" for k, v in kwargs.items()),
        "augment_timm_steps_per_second": timm_sps,
        "augment_kubetune_steps_per_second": kt_sps,
        "augment_throughput_ratio": kt_sps / timm_sps,
        "augment_target": ">= 0.97",
    }


def run() -> dict[str, Any]:
    import logging

    import torch

    from bench import preemption_lost_steps

    logging.getLogger("kubetune_trainer").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        ref = TimmStyle(Path(tmp) / "ref")
        for _ in ref.steps():
            pass
        first = TimmStyle(Path(tmp) / "killed")
        done_before_kill = sum(1 for _ in first.steps(kill_at=(KILL_EPOCH, KILL_BATCH)))
        per_epoch = len(first.loader)
        del first  # SIGKILL: nothing in memory survives
        second = TimmStyle(Path(tmp) / "killed")
        second.resume()
        lost = done_before_kill - second.start_epoch * per_epoch
        for _ in second.steps():
            pass
        exact = all(
            torch.equal(a, b) for a, b in zip(ref.weights().values(), second.weights().values(), strict=True)
        )
        timm_sps, kubetune_sps = paired_throughput(Path(tmp))
        try:
            augmented = augmented_throughput(Path(tmp))
        except Exception as e:  # a broken augmentation must not lose the keys above
            augmented = {"augment_error": f"{type(e).__name__}: {e}"}
    kt = preemption_lost_steps.run()
    return {
        "model": MODEL,
        "steps_per_epoch": per_epoch,
        "killed_at": f"epoch {KILL_EPOCH} batch {KILL_BATCH}",
        "timm_steps_per_second": timm_sps,
        "kubetune_steps_per_second": kubetune_sps,
        "timm_sigkill_lost_steps": lost,
        "timm_resumed_at_epoch": second.start_epoch,
        "timm_resume_bitwise_equal": exact,
        "timm_sigterm_lost_steps": lost,  # train.py has no SIGTERM handler: a graceful stop loses the same
        "kubetune_sigkill_lost_steps": kt["sigkill_lost_steps"],
        "kubetune_sigterm_lost_steps": kt["sigterm_lost_steps"],
        "kubetune_every_steps": kt["every_steps"],
        "kubetune_resume_bitwise_equal": "yes (tests/trainer/test_exactness.py)",
        "throughput_ratio": kubetune_sps / timm_sps,
        **augmented,
    }


if __name__ == "__main__":
    print(run())
