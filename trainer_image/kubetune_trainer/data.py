"""Datasets, transforms and resumable deterministic sampling.

The order of samples is a pure function of (seed, epoch, rank, world size): a resumed run skips the batches
it already consumed and sees exactly the batches an uninterrupted run would. Train transforms carry no
random augmentation, so a sample's tensor is a pure function of its index.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from kubetune_trainer.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MAX_BAD_FRACTION = 0.10
"""Unreadable images are skipped and counted; more than this share of them is a data error (exit 2)."""


class ImageListDataset(Dataset[tuple[torch.Tensor, int]]):
    """(path, label) pairs with a fixed transform."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


class SyntheticDataset(Dataset[tuple[torch.Tensor, int]]):
    """Random images whose mean depends on the label (so it is learnable); sample i is a function of (seed, i)."""

    def __init__(self, indices: list[int], num_classes: int, image_size: int, seed: int) -> None:
        self.indices = indices
        self.num_classes = num_classes
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self.indices[index]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        label = i % self.num_classes
        x = torch.randn(3, self.image_size, self.image_size, generator=g) * 0.5
        return x + (label / max(1, self.num_classes - 1) - 0.5), label


@dataclass
class DataBundle:
    train: Dataset[Any]
    val: Dataset[Any] | None
    classes: list[str]
    image_size: int
    skipped_images: int
    eval_cfg: dict[str, Any]
    """eval_data_config(): the transform every split uses, and what the export's pretrained_cfg states."""


def _scan_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[tuple[str, int]], list[str], int]:
    if not root.is_dir():
        raise ConfigError(f"data.path: {root} is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    if not classes:
        raise ConfigError(f"data.path: {root} has no class folders (expected {root}/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(f"data.path: {root} has classes {unknown} that are not in the training set")
    samples: list[tuple[str, int]] = []
    bad = 0
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(p) as img:  # reads the header only: cheap, catches non-images
                    img.size  # noqa: B018
            except Exception as e:  # PIL raises many types for a bad file
                bad += 1
                if bad <= 10:
                    log.warning("skipping unreadable image %s: %s", p, e)
                continue
            samples.append((str(p), label))
    total = len(samples) + bad
    if bad:
        log.warning("skipped %d unreadable images of %d under %s", bad, total, root)
    if total == 0:
        raise ConfigError(f"data.path: no images under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    if bad / total > MAX_BAD_FRACTION:
        raise ConfigError(
            f"data.path: {bad} of {total} images under {root} are unreadable "
            f"(more than {MAX_BAD_FRACTION:.0%}); fix or remove them"
        )
    return samples, classes, bad


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, val) index split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = round(n * val_fraction)
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def eval_data_config(model_data_cfg: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The eval transform's settings (timm `create_transform` keyword names) for the size trained at.

    Training, evaluation and the exported `pretrained_cfg` all use exactly these values, so a user who
    resolves the exported model's data config with timm gets the transform the model was trained with.
    """
    return {
        "input_size": (3, image_size, image_size),
        "interpolation": model_data_cfg.get("interpolation", "bilinear"),
        "mean": tuple(model_data_cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(model_data_cfg.get("std", (0.229, 0.224, 0.225))),
        "crop_pct": model_data_cfg.get("crop_pct", 1.0),
        "crop_mode": model_data_cfg.get("crop_mode", "center"),
    }


def build_transform(eval_cfg: dict[str, Any]) -> Any:
    from timm.data import create_transform

    # no random augmentation: exact resume needs sample = f(index)
    return create_transform(is_training=False, **eval_cfg)


def build_datasets(
    cfg: DataConfig, num_classes: int | None, model_data_cfg: dict[str, Any], seed: int
) -> DataBundle:
    """Datasets for the spec; ConfigError (exit 2) for missing or broken data."""
    image_size = cfg.imageSize or int(model_data_cfg["input_size"][-1])
    eval_cfg = eval_data_config(model_data_cfg, image_size)
    if cfg.format == "synthetic":
        k = num_classes or 10
        train_idx, val_idx = seeded_split(cfg.syntheticSamples, cfg.valFraction, seed)
        val: Dataset[Any] | None = SyntheticDataset(val_idx, k, image_size, seed) if val_idx else None
        return DataBundle(
            SyntheticDataset(train_idx, k, image_size, seed),
            val,
            [f"class_{i}" for i in range(k)],
            image_size,
            0,
            eval_cfg,
        )
    root = Path(cfg.path or "")
    if not root.exists():
        raise ConfigError(f"data.path: {root} does not exist")
    transform = build_transform(eval_cfg)
    if (root / "train").is_dir():
        train_samples, classes, bad = _scan_folder(root / "train")
        val_samples: list[tuple[str, int]] = []
        if (root / "val").is_dir():
            val_samples, _, bad_val = _scan_folder(root / "val", classes)
            bad += bad_val
    else:
        samples, classes, bad = _scan_folder(root)
        train_idx, val_idx = seeded_split(len(samples), cfg.valFraction, seed)
        train_samples = [samples[i] for i in train_idx]
        val_samples = [samples[i] for i in val_idx]
    if num_classes is not None and num_classes < len(classes):
        raise ConfigError(
            f"model.numClasses: {num_classes} is fewer than the {len(classes)} classes found in {root}"
        )
    val = ImageListDataset(val_samples, transform) if val_samples else None
    return DataBundle(ImageListDataset(train_samples, transform), val, classes, image_size, bad, eval_cfg)


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of a seeded per-epoch permutation, sharded by rank, that can start at any batch.

    Epoch e's permutation is randperm(n, seed=hash(seed, e)); rank r takes every world-th index; the last
    partial batch is dropped so every rank runs the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return (self.n // self.world_size) // self.batch_size

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start_batch": self.start_batch, "n": self.n}

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
        perm = torch.randperm(self.n, generator=g).tolist()
        return perm[self.rank :: self.world_size][: self.n // self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.permutation(self.epoch)
        for b in range(self.start_batch, self.batches_per_epoch):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)


def _worker_init(worker_id: int) -> None:
    # Each worker's seed derives from the loader's explicit generator, never from the trainer's global RNG.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset[Any], batch_sampler: Sampler[list[int]], num_workers: int, seed: int
) -> DataLoader[Any]:
    """A loader that never draws from the global torch RNG (its own generator seeds the workers)."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_worker_init,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def eval_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Strided shard of the validation set; sums are all-reduced, so nothing is padded or counted twice."""
    return list(range(rank, n, world_size))


def steps_per_epoch(batches: int, accumulation: int) -> int:
    return batches // accumulation


def epochs_for(max_steps: int, per_epoch: int) -> int:
    return math.ceil(max_steps / per_epoch)
