"""data.augment and data.sampling: seeded per-sample augmentation and the balanced resumable sampler.

A sample's augmented tensor is a pure function of (seed, epoch, index): the same in any worker count and
any fresh dataset object, different across epochs, and drawing it leaves the caller's RNG streams alone.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kubetune_trainer.components import build_sampler
from kubetune_trainer.config import AugmentConfig, ConfigError, DataConfig, TrainingConfig, parse_spec
from kubetune_trainer.data import (
    BalancedBatchSampler,
    DataBundle,
    ImageListDataset,
    ResumableBatchSampler,
    SyntheticDataset,
    build_datasets,
    build_transform,
    dataset_labels,
    make_batch_sampler,
    make_loader,
    stand_in_index,
)
from kubetune_trainer.model import data_config
from kubetune_trainer.runtime import Runtime

from .helpers import tiny_spec, write_digits

pytestmark = pytest.mark.trainer

# Every RNG the transforms use: python (crop, interpolation, RandAugment ops, erasing boxes), numpy
# (RandAugment's op choice), torch (flips, pixel-noise erasing); COLOR covers torchvision's ColorJitter.
RAND = AugmentConfig(
    autoAugment="rand-m9-mstd0.5-inc1", vflip=0.5, reprob=0.5, remode="pixel", interpolation="random"
)
COLOR = AugmentConfig(scale=(0.5, 1.0), colorJitter=0.4, reprob=0.5, remode="rand", recount=2)
BATCHES = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


@pytest.fixture(scope="module")
def mcfg() -> dict[str, object]:
    return data_config("test_resnet")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("aug") / "d", range(3))


def bundle(root: Path, mcfg: dict[str, object], augment: AugmentConfig | None) -> DataBundle:
    return build_datasets(DataConfig(path=str(root), imageSize=32, augment=augment), None, mcfg, seed=5)


def load(ds: Any, epoch: int, workers: int, batches: list[list[int]] = BATCHES) -> torch.Tensor:
    loader = make_loader(ds, batches, workers, seed=0, epoch=epoch)  # type: ignore[arg-type]
    return torch.cat([x for x, _ in loader])


def rng_states() -> tuple[bytes, object, bytes]:
    numpy_state = b"".join(np.asarray(part).tobytes() for part in np.random.get_state())
    return torch.get_rng_state().numpy().tobytes(), random.getstate(), numpy_state


def write_truncated_jpeg(path: Path) -> None:
    """A JPEG cut in half: its header passes the scan, its pixels do not decode."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("augment", [RAND, COLOR], ids=["randaugment", "colorjitter"])
def test_same_index_and_epoch_gives_equal_bytes_in_any_worker_and_object(
    digits: Path, mcfg: dict[str, object], augment: AugmentConfig
) -> None:
    ds = bundle(digits, mcfg, augment).train
    assert isinstance(ds, ImageListDataset) and ds.augmented
    in_process = load(ds, epoch=3, workers=0)
    assert torch.equal(in_process, load(ds, epoch=3, workers=2))
    assert torch.equal(in_process, load(bundle(digits, mcfg, augment).train, epoch=3, workers=0))
    # Order-free: a sample's tensor does not depend on which samples came before it.
    backwards = load(ds, epoch=3, workers=0, batches=[b[::-1] for b in BATCHES[::-1]])
    assert torch.equal(in_process, backwards.flip(0))


def test_epochs_give_different_tensors_and_differ_from_the_eval_transform(
    digits: Path, mcfg: dict[str, object]
) -> None:
    ds = bundle(digits, mcfg, RAND).train
    one, two = load(ds, epoch=1, workers=0), load(ds, epoch=2, workers=0)
    per_sample_equal = [torch.equal(a, b) for a, b in zip(one, two, strict=True)]
    assert not any(per_sample_equal)
    plain = bundle(digits, mcfg, None).train
    assert isinstance(plain, ImageListDataset) and not plain.augmented
    assert not torch.equal(one, load(plain, epoch=1, workers=0))


def test_val_keeps_the_eval_transform(digits: Path, mcfg: dict[str, object]) -> None:
    b = bundle(digits, mcfg, RAND)
    assert isinstance(b.val, ImageListDataset) and not b.val.augmented
    eval_tf = build_transform(b.eval_cfg)
    path, label = b.val.samples[0]
    with Image.open(path) as img:
        expected = eval_tf(img.convert("RGB"))
    x, y = b.val[0]
    assert y == label and torch.equal(x, expected)


def test_global_rng_states_are_untouched_in_process(digits: Path, mcfg: dict[str, object]) -> None:
    ds = bundle(digits, mcfg, RAND).train
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    before = rng_states()
    load(ds, epoch=0, workers=0)
    assert rng_states() == before
    # The streams continue as if no sample had been drawn.
    drawn = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    assert torch.equal(drawn[0], torch.rand(3)) and drawn[1:] == (random.random(), np.random.rand())


def test_stand_in_for_an_undecodable_image_is_seeded_too(tmp_path: Path, mcfg: dict[str, object]) -> None:
    root = write_digits(tmp_path / "d", range(2))
    write_truncated_jpeg(root / "1" / "truncated.jpg")
    ds = bundle(root, mcfg, RAND).train
    assert isinstance(ds, ImageListDataset)
    bad = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("truncated.jpg"))
    batches = [[bad, (bad + 1) % len(ds)]]
    first = load(ds, epoch=1, workers=0, batches=batches)
    assert torch.equal(first, load(bundle(root, mcfg, RAND).train, epoch=1, workers=2, batches=batches))
    assert not torch.equal(first, load(ds, epoch=2, workers=0, batches=batches))
    # Seeded from the index actually loaded and the attempt, not from the bad index.
    used = stand_in_index(ds.seed, bad, 0, len(ds))
    assert not torch.equal(first[0], load(ds, epoch=1, workers=0, batches=[[used]])[0])
    assert ds.bad_count() == 1


def test_a_draw_the_transform_cannot_take_is_redrawn_from_the_next_seed(digits: Path) -> None:
    """As timm's RandAugment posterize at 0 bits, which recent Pillow rejects (about 1 in 1000 samples)."""

    raised = []

    def picky(img: Image.Image) -> torch.Tensor:
        if random.random() < 0.5:
            raised.append(1)
            raise ValueError("bits must be between or equal to 1 and 8")
        return torch.tensor([random.random()])

    samples = [(str(p), 0) for p in sorted(digits.rglob("*.png"))[:40]]
    a, b = (ImageListDataset(samples, picky, seed=1, augmented=True) for _ in range(2))
    batches = [list(range(20)), list(range(20, 40))]
    assert torch.equal(load(a, epoch=0, workers=0, batches=batches), load(b, 0, 2, batches))
    # With this seed every sample gets through within the four draws (some need two or three).
    assert len(raised) > 10 and a.bad_count() == 0
    never = ImageListDataset(samples, lambda img: 1 / 0, augmented=True)
    with pytest.raises(ConfigError, match=r"^data\.maxBadFraction: "):
        never[0]


def test_augment_needs_an_image_folder() -> None:
    spec = tiny_spec(data={"augment": {"reprob": 0.25}})
    with pytest.raises(ConfigError, match=r"^data\.augment: needs data\.format imagefolder"):
        parse_spec(spec)
    spec = tiny_spec(data={"format": "imagefolder", "path": "/x", "augment": {"scale": [0.9, 0.2]}})
    with pytest.raises(ConfigError, match=r"^data\.augment\.scale: must be \[min, max\]"):
        parse_spec(spec)


def test_a_policy_timm_cannot_parse_is_exit_2_naming_the_field(digits: Path, mcfg: dict[str, object]) -> None:
    """timm asserts on an unknown section (rand-q9): that is a config error (exit 2), not a crash (exit 1)."""
    with pytest.raises(ConfigError, match=r"^data\.augment\.autoAugment: timm cannot use 'rand-q9'"):
        bundle(digits, mcfg, AugmentConfig(autoAugment="rand-q9"))


# -- data.sampling: balanced ------------------------------------------------------------------------------
IMBALANCED = [0] * 900 + [1] * 90 + [2] * 10


def batches_of(sampler: ResumableBatchSampler, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_position(epoch, start)
    return list(sampler)


def test_balanced_is_seeded_per_epoch() -> None:
    a, b = BalancedBatchSampler(IMBALANCED, 10, seed=1), BalancedBatchSampler(IMBALANCED, 10, seed=1)
    assert batches_of(a, 3) == batches_of(b, 3)
    assert batches_of(a, 3) != batches_of(a, 4)
    assert batches_of(a, 3) != batches_of(BalancedBatchSampler(IMBALANCED, 10, seed=2), 3)


def test_balanced_draws_every_class_about_equally() -> None:
    s = BalancedBatchSampler(IMBALANCED, 10, seed=0)
    counts = Counter(IMBALANCED[i] for e in range(3) for batch in batches_of(s, e) for i in batch)
    assert sorted(counts) == [0, 1, 2]
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values()), counts
    rare = [i for e in range(3) for batch in batches_of(s, e) for i in batch if IMBALANCED[i] == 2]
    assert set(rare) == set(range(990, 1000))  # with replacement, and within its class only


def test_balanced_ranks_shard_one_draw_disjointly() -> None:
    full = [i for batch in batches_of(BalancedBatchSampler(IMBALANCED, 1, seed=4), 2) for i in batch]
    shards = [BalancedBatchSampler(IMBALANCED, 7, seed=4, rank=r, world_size=3) for r in range(3)]
    seen = [[i for batch in batches_of(s, 2) for i in batch] for s in shards]
    per_rank = (len(IMBALANCED) // 3) // 7 * 7
    for r, mine in enumerate(seen):
        assert mine == full[r::3][:per_rank]  # disjoint positions of the same draw, as uniform shards
    assert shards[0].batches_per_epoch == 47 and len(seen[0]) == per_rank


def test_balanced_resumes_from_any_batch() -> None:
    full = batches_of(BalancedBatchSampler(IMBALANCED, 32, seed=7, rank=1, world_size=2), 5)
    for k in (0, 1, 7, len(full)):
        part = BalancedBatchSampler(IMBALANCED, 32, seed=7, rank=1, world_size=2)
        part.set_position(5, k)
        assert list(part) == full[k:] and len(part) == len(full) - k
        assert part.state_dict() == {"seed": 7, "epoch": 5, "start_batch": k, "n": len(IMBALANCED)}


def test_make_batch_sampler_and_build_sampler_pick_by_data_sampling() -> None:
    uniform = make_batch_sampler("uniform", IMBALANCED, 10, seed=3)
    assert type(uniform) is ResumableBatchSampler
    assert batches_of(uniform, 1) == batches_of(ResumableBatchSampler(1000, 10, seed=3), 1)
    assert isinstance(make_batch_sampler("balanced", IMBALANCED, 10, seed=3), BalancedBatchSampler)
    synthetic = SyntheticDataset(list(range(50)), num_classes=4, image_size=8, seed=0)
    assert dataset_labels(synthetic) == [i % 4 for i in range(50)]
    sampler, steps = build_sampler(synthetic, "balanced", TrainingConfig(batchSize=8), Runtime())
    assert isinstance(sampler, BalancedBatchSampler) and sampler.n == 50 and steps == 6
