"""Datasets, transforms and resumable deterministic sampling.

The order of samples is a pure function of (seed, epoch, rank, world size): a resumed run skips the batches
it already consumed and sees exactly the batches an uninterrupted run would, whether uniform (a permutation)
or balanced (drawn with replacement, weights 1/class count). With data.augment the training split runs
timm's random training transform, but right before it the torch (CPU), python and numpy RNGs are seeded
from (seed, epoch, sample index) and restored afterwards: a sample's tensor is a pure function of
(index, epoch) in any process or worker, and the trainer's own RNG streams are left as they were. Without
data.augment (and always for val) the eval transform runs, and a sample is a pure function of its index.

Bad images: the up-front scan reads headers only, skips (and counts) files whose header is unreadable, and
fails (exit 2) when more than data.maxBadFraction of a folder is. A file whose header opens but whose pixels
do not decode (a truncated JPEG) is found only when it is loaded: ImageListDataset then returns a seeded
stand-in sample, a pure function of (seed, index, attempt), so exact resume stays exact, flags the file in
shared memory (the loader's worker processes write, the main process reads) and logs it; check_bad() turns
more than data.maxBadFraction of a split into exit 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from kubetune_trainer.config import AugmentConfig, ConfigError, DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
STAND_IN_ATTEMPTS = 8
"""Seeded stand-ins tried for an image that fails to decode before the sample is an error (exit 2)."""
LOGGED_BAD = 10
"""Bad images logged one by one per split (and per scanned folder); the rest are only counted."""
NAMED_BAD = 5
"""Paths an error message lists."""
AUGMENT_DRAWS = 4
"""Seeded draws of the random transform tried per sample: a draw that raises (timm's RandAugment posterize
at 0 bits, which recent Pillow rejects) is replaced by the next seed's, the same in every run."""


def stand_in_index(seed: int, index: int, attempt: int, n: int) -> int:
    """The attempt-th stand-in for sample `index` of `n` (never `index` itself): a pure function of its
    arguments, so every process, worker and resumed run substitutes the same sample."""
    digest = hashlib.blake2b(f"{seed}/{index}/{attempt}".encode(), digest_size=8).digest()
    return (index + 1 + int.from_bytes(digest, "little") % (n - 1)) % n


def derived_seed(*parts: object) -> int:
    """A 64-bit seed that is a pure function of `parts` (the same in every process, machine and run)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_PRESERVING = [0]
"""Depth of preserved_rngs() blocks in this process: inside one, seeded_rngs() only seeds."""


@contextlib.contextmanager
def preserved_rngs() -> Iterator[None]:
    """Restore the CPU torch, python `random` and numpy global RNG states after the block, however much
    seeded_rngs() inside reseeds them (one save and restore for a whole batch: numpy's get/set_state alone
    costs ~120 us, more than the seeding)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    _PRESERVING[0] += 1
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        _PRESERVING[0] -= 1
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the CPU torch, python `random` and numpy global RNGs with `seed` for the block, so randomness
    inside (timm transforms, Mixup) is a function of `seed` alone. In the training process all three are
    restored afterwards (by the enclosing preserved_rngs() block, if any), so its own streams are untouched;
    a DataLoader worker's global RNGs serve only these seeded blocks, so they are not restored there.
    CUDA generators are neither seeded nor touched."""
    if _PRESERVING[0] or torch.utils.data.get_worker_info() is not None:
        _seed_all(seed)
        yield
        return
    with preserved_rngs():
        _seed_all(seed)
        yield


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that also reseeds CUDA
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])


def _name_paths(paths: list[str]) -> str:
    more = f" and {len(paths) - NAMED_BAD} more" if len(paths) > NAMED_BAD else ""
    return ", ".join(paths[:NAMED_BAD]) + more


class ImageListDataset(Dataset[tuple[torch.Tensor, int]]):
    """(path, label) pairs with a transform; an image that fails to decode is replaced by a seeded
    stand-in (whose own label comes with it) and flagged, see bad_count() and bad_paths().

    `augmented`: the transform is random (data.augment); each call runs it with the global RNGs seeded
    from (seed, epoch, index loaded, stand-in attempt) and restores them after, see seeded_rngs().
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Any,
        seed: int = 0,
        split: str = "train",
        augmented: bool = False,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.seed = seed
        self.split = split
        self.augmented = augmented
        self.epoch: int | None = None
        """The epoch being loaded: seeds the augmentation (None counts as 0) and names the epoch in
        warnings. make_loader(epoch=...) sets it before the workers fork (a loader is made per epoch)."""
        # Shared memory, so flags set in DataLoader worker processes are seen by the main process.
        self._bad = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self._changed = torch.zeros(1, dtype=torch.uint8).share_memory_()
        self._count = 0  # bad_count()'s cache, per process

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int, attempt: int = 0) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # decodes: a broken file fails here, before any RNG is touched
        if not self.augmented:
            return self.transform(rgb), label
        draw = 0
        while True:
            try:
                with seeded_rngs(derived_seed("augment", self.seed, self.epoch or 0, index, attempt, draw)):
                    return self.transform(rgb), label
            except Exception:  # an op that cannot take this draw; the last one counts as a bad sample
                draw += 1
                if draw == AUGMENT_DRAWS:
                    raise

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        failed: list[tuple[int, Exception]] = []
        n = len(self.samples)
        for attempt in range(STAND_IN_ATTEMPTS + 1 if n > 1 else 1):
            i = index if attempt == 0 else stand_in_index(self.seed, index, attempt - 1, n)
            try:
                item = self._load(i, attempt)
            except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                failed.append((i, e))
                continue
            if failed:
                self._record(index, failed, i)
            return item
        self._record(index, failed, None)
        raise ConfigError(
            f"data.maxBadFraction: {self.split} image {self.samples[index][0]} and the {len(failed) - 1} "
            f"seeded stand-ins tried for it all failed to decode ({failed[0][1]}); "
            f"remove or replace the broken files under data.path"
        )

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch (the DataLoader's fetcher calls this): augmented samples in the training process share one
        save and restore of the global RNGs (see preserved_rngs); each is still seeded on its own."""
        if not self.augmented or torch.utils.data.get_worker_info() is not None:
            return [self[i] for i in indices]
        with preserved_rngs():
            return [self[i] for i in indices]

    def _record(self, index: int, failed: list[tuple[int, Exception]], used: int | None) -> None:
        """Flag the images that failed; warn once about each of the split's first LOGGED_BAD."""
        for i, e in failed:
            new = not self._bad[i]  # else warned about already, in this or another worker
            self._bad[i] = 1
            self._changed[0] = 1  # after the flag: see bad_count()
            seen = int(self._bad.sum()) if new else LOGGED_BAD + 1
            if seen > LOGGED_BAD:
                continue
            if i != index:
                then = f"it was the stand-in for image {index}"
            elif used is None:
                then = "no stand-in decodes either"
            else:
                then = f"using image {used} ({self.samples[used][0]}) in its place"
            if seen == LOGGED_BAD:
                then += "; further bad images of this split are counted, not logged"
            where = f" at epoch {self.epoch}" if self.epoch is not None else ""
            path, error = self.samples[i][0], f"{type(e).__name__}: {e}"
            log.warning("cannot decode %s image %d%s: %s (%s); %s", self.split, i, where, path, error, then)

    def bad_count(self) -> int:
        """Distinct images that failed to decode so far, in any process (O(1) unless one was just found)."""
        if self._changed[0]:
            # Cleared before counting: a flag set during the sum sets it again, so it is never missed.
            self._changed[0] = 0
            self._count = int(self._bad.sum())
        return self._count

    def bad_paths(self) -> list[str]:
        """Paths of the images that failed to decode so far, in index order."""
        return [self.samples[i][0] for i in self._bad.nonzero().flatten().tolist()]


def bad_count(dataset: Dataset[Any] | None) -> int:
    """dataset.bad_count() for an image folder split; 0 for splits that cannot go bad (None, synthetic)."""
    return dataset.bad_count() if isinstance(dataset, ImageListDataset) else 0


def report_bad(dataset: Dataset[Any], count: int, split: str, step: int, max_fraction: float) -> None:
    """Log the split's undecodable images so far (WARNING, with the step and paths), then check_bad()."""
    paths = dataset.bad_paths() if isinstance(dataset, ImageListDataset) else []
    more = f" and {len(paths) - 10} more" if len(paths) > 10 else ""
    log.warning(
        "step %d: %d %s image(s) failed to decode so far, each replaced by a seeded stand-in: %s",
        step,
        count,
        split,
        ", ".join(paths[:10]) + more,
    )
    check_bad(dataset, max_fraction, split, count=count)


def check_bad(
    dataset: Dataset[Any] | None, max_fraction: float, split: str, count: int | None = None
) -> None:
    """ConfigError (exit 2) when more than max_fraction of the split failed to decode; cheap when not.

    `count` overrides dataset.bad_count() (under DDP: the all-reduced MAX, so every rank decides alike).
    A no-op for datasets that cannot go bad (None, synthetic).
    """
    if not isinstance(dataset, ImageListDataset):
        return
    bad = dataset.bad_count() if count is None else count
    n = len(dataset)
    if bad <= max_fraction * n:
        return
    raise ConfigError(
        f"data.maxBadFraction: {bad} of {n} {split} images failed to decode, more than the "
        f"{max_fraction:g} allowed: {_name_paths(dataset.bad_paths())}; remove or replace these files, "
        f"or raise data.maxBadFraction"
    )


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
    """Images the up-front scan skipped (header unreadable), train and val together."""
    eval_cfg: dict[str, Any]
    """eval_data_config(): the transform every split uses, and what the export's pretrained_cfg states."""

    def bad_images(self) -> int:
        """Images that failed to decode while training or evaluating so far (train + val; skipped_images
        not included), as seen by this process."""
        return sum(d.bad_count() for d in (self.train, self.val) if isinstance(d, ImageListDataset))


def _scan_folder(
    root: Path, max_fraction: float, classes: list[str] | None = None
) -> tuple[list[tuple[str, int]], list[str], int]:
    """(samples, classes, skipped) of <root>/<class>/**/<image>; `classes` given: a val folder of those."""
    if not root.is_dir():
        raise ConfigError(f"data.path: {root} is not a directory")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    defines_classes = classes is None
    if classes is None:
        classes = found
    if not classes:
        raise ConfigError(f"data.path: {root} has no class folders (expected {root}/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(f"data.path: {root} has classes {unknown} that are not in the training set")
    samples: list[tuple[str, int]] = []
    bad: list[str] = []
    empty: list[str] = []
    missing: list[str] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            # Only a val folder can lack a class of train/: that class is not evaluated (eval metrics
            # average over the val images present); it is still trained, and the model keeps its output.
            missing.append(name)
            continue
        readable = unreadable = 0
        for p in sorted(folder.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(p) as img:  # reads the header only: cheap, catches non-images
                    img.size  # noqa: B018
            except Exception as e:  # PIL raises many types for a bad file
                bad.append(str(p))
                unreadable += 1
                if len(bad) <= LOGGED_BAD:
                    log.warning("skipping unreadable image %s: %s", p, e)
                continue
            samples.append((str(p), label))
            readable += 1
        if readable == 0:
            missing.append(name)
            empty.append(f"{folder} ({unreadable} unreadable)" if unreadable else str(folder))
    total = len(samples) + len(bad)
    if bad:
        log.warning("skipped %d unreadable images of %d under %s", len(bad), total, root)
    if total == 0:
        raise ConfigError(f"data.path: no images under {root} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    if empty and defines_classes:
        # Every class folder is an output of the model: one without images would never be trained.
        raise ConfigError(
            f"data.path: class folders without readable images: {_name_paths(empty)}; add images "
            f"(extensions {', '.join(IMAGE_EXTENSIONS)}) or remove the folders"
        )
    if missing:
        log.info("%s has no images of classes %s: they are trained but not evaluated", root, missing)
    if len(bad) > max_fraction * total:
        raise ConfigError(
            f"data.path: {len(bad)} of {total} images under {root} are unreadable, more than the "
            f"data.maxBadFraction of {max_fraction:g} allowed: {_name_paths(bad)}; remove or replace "
            f"these files, or raise data.maxBadFraction"
        )
    return samples, classes, len(bad)


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
    """The eval transform (val always, train without data.augment): deterministic."""
    from timm.data import create_transform

    return create_transform(is_training=False, **eval_cfg)


def build_train_transform(eval_cfg: dict[str, Any], augment: AugmentConfig) -> Any:
    """timm's random training transform for data.augment, at the eval transform's size, mean and std.

    Random: ImageListDataset(augmented=True) seeds it per sample, which is what keeps resume exact.
    """
    from timm.data import create_transform

    try:
        return create_transform(
            input_size=eval_cfg["input_size"],
            is_training=True,
            scale=(augment.scale[0], augment.scale[1]),
            ratio=(augment.ratio[0], augment.ratio[1]),
            hflip=augment.hflip,
            vflip=augment.vflip,
            color_jitter=augment.colorJitter,
            auto_augment=augment.autoAugment,
            interpolation=augment.interpolation or eval_cfg["interpolation"],
            mean=eval_cfg["mean"],
            std=eval_cfg["std"],
            re_prob=augment.reprob,
            re_mode=augment.remode,
            re_count=augment.recount,
        )
    except (AssertionError, ValueError, KeyError, IndexError) as e:  # timm parses the policy string here
        if augment.autoAugment is None:
            raise
        raise ConfigError(
            f"data.augment.autoAugment: timm cannot use {augment.autoAugment!r} ({type(e).__name__}: {e}); "
            "write a timm policy such as rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2 (AugMix), "
            "original or v0 (AutoAugment), or remove it"
        ) from e


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
    frac = cfg.maxBadFraction
    if (root / "train").is_dir():
        train_samples, classes, bad = _scan_folder(root / "train", frac)
        val_samples: list[tuple[str, int]] = []
        if (root / "val").is_dir():
            val_samples, _, bad_val = _scan_folder(root / "val", frac, classes)
            bad += bad_val
    else:
        samples, classes, bad = _scan_folder(root, frac)
        train_idx, val_idx = seeded_split(len(samples), cfg.valFraction, seed)
        train_samples = [samples[i] for i in train_idx]
        val_samples = [samples[i] for i in val_idx]
    if num_classes is not None and num_classes < len(classes):
        raise ConfigError(
            f"model.numClasses: {num_classes} is fewer than the {len(classes)} classes found in {root}"
        )
    if cfg.augment is not None:
        train = ImageListDataset(
            train_samples, build_train_transform(eval_cfg, cfg.augment), seed, "train", augmented=True
        )
    else:
        train = ImageListDataset(train_samples, transform, seed, "train")
    val = ImageListDataset(val_samples, transform, seed, "val") if val_samples else None
    return DataBundle(train, val, classes, image_size, bad, eval_cfg)


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


class BalancedBatchSampler(ResumableBatchSampler):
    """ResumableBatchSampler whose epoch is n indices drawn with replacement, each with weight 1/(count of
    its label), so every class is drawn about equally often; sharded, batched and resumed the same way.

    The draw is a pure function of (seed, epoch): a class uniformly among those present, then a sample
    uniformly within it (the same distribution as weights 1/count, without torch.multinomial's 2**24
    category limit), from a torch.Generator seeded with derived_seed("balanced", seed, epoch).
    """

    def __init__(
        self, labels: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        super().__init__(len(labels), batch_size, seed, rank, world_size)
        lab = torch.as_tensor(list(labels), dtype=torch.long)
        self._members = torch.argsort(lab, stable=True)  # sample indices grouped by label
        _, counts = torch.unique_consecutive(lab[self._members], return_counts=True)
        self._counts = counts
        self._starts = torch.cumsum(counts, 0) - counts

    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(derived_seed("balanced", self.seed, epoch) % 2**63)
        k = len(self._counts)
        cls = torch.randint(k, (self.n,), generator=g)
        within = (torch.rand(self.n, generator=g, dtype=torch.float64) * self._counts[cls]).long()
        within = torch.minimum(within, self._counts[cls] - 1)
        drawn = self._members[self._starts[cls] + within].tolist()
        return drawn[self.rank :: self.world_size][: self.n // self.world_size]


def dataset_labels(dataset: Dataset[Any]) -> list[int]:
    """The label of every sample of an ImageListDataset or SyntheticDataset, in index order."""
    if isinstance(dataset, ImageListDataset):
        return [label for _, label in dataset.samples]
    if isinstance(dataset, SyntheticDataset):
        return [i % dataset.num_classes for i in dataset.indices]
    raise TypeError(f"no labels known for {type(dataset).__name__}")


def make_batch_sampler(
    sampling: str, labels: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
) -> ResumableBatchSampler:
    """This rank's resumable batch sampler for data.sampling (uniform or balanced) over `labels`."""
    if sampling == "balanced":
        return BalancedBatchSampler(labels, batch_size, seed, rank, world_size)
    if sampling != "uniform":
        raise ConfigError(f"data.sampling: must be uniform or balanced, got {sampling!r}")
    return ResumableBatchSampler(len(labels), batch_size, seed, rank, world_size)


def _worker_init(worker_id: int) -> None:
    # Each worker's seed derives from the loader's explicit generator, never from the trainer's global RNG.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(
    dataset: Dataset[Any],
    batch_sampler: Sampler[list[int]],
    num_workers: int,
    seed: int,
    epoch: int | None = None,
) -> DataLoader[Any]:
    """A loader that never draws from the global torch RNG (its own generator seeds the workers).

    `epoch` becomes an ImageListDataset's `epoch`, set here before the workers fork: it seeds data.augment
    (so make one loader per epoch) and names the epoch in bad-image warnings.
    """
    if epoch is not None and isinstance(dataset, ImageListDataset):
        dataset.epoch = epoch
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
