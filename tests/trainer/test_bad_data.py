"""Images that fail to decode mid-run: a seeded stand-in keeps the run (and exact resume) going, each is
logged with its path, and more than data.maxBadFraction of a split is exit 2 naming the files."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kubetune_trainer.config import ConfigError, DataConfig
from kubetune_trainer.data import (
    DataBundle,
    ImageListDataset,
    SyntheticDataset,
    build_datasets,
    check_bad,
    make_loader,
    stand_in_index,
)
from kubetune_trainer.model import data_config

from .helpers import Job, tiny_spec, write_digits

pytestmark = pytest.mark.trainer


def write_truncated_jpeg(path: Path, seed: int = 0) -> Path:
    """A JPEG cut in half: the header opens (the up-front scan passes it), decoding the pixels fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def mcfg() -> dict[str, object]:
    return data_config("test_resnet")


@pytest.fixture(scope="module")
def digits_with_bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Digits 0-2 plus one truncated JPEG in class 1: (root, bad file)."""
    root = write_digits(tmp_path_factory.mktemp("bad") / "digits", range(3))
    return root, write_truncated_jpeg(root / "1" / "truncated.jpg")


def bundle(root: Path, mcfg: dict[str, object], seed: int = 0) -> DataBundle:
    return build_datasets(DataConfig(path=str(root), imageSize=16, valFraction=0.0), None, mcfg, seed)


def train_set(root: Path, mcfg: dict[str, object], seed: int = 0) -> ImageListDataset:
    ds = bundle(root, mcfg, seed).train
    assert isinstance(ds, ImageListDataset)
    return ds


def index_of(ds: ImageListDataset, path: Path) -> int:
    return [p for p, _ in ds.samples].index(str(path))


def test_truncated_jpeg_passes_the_scan_but_does_not_decode(digits_with_bad: tuple[Path, Path]) -> None:
    _, bad = digits_with_bad
    with Image.open(bad) as img:  # what the scan reads: fine
        assert img.size == (64, 64)
    with pytest.raises(OSError, match="truncated"), Image.open(bad) as img:  # what __getitem__ did
        img.convert("RGB")


def test_stand_in_index_is_pure_and_never_the_index_itself() -> None:
    n = 7
    for seed in range(3):
        for i in range(n):
            picks = [stand_in_index(seed, i, a, n) for a in range(8)]
            assert all(0 <= j < n and j != i for j in picks)
            assert picks == [stand_in_index(seed, i, a, n) for a in range(8)]
    assert len({stand_in_index(0, 3, a, 1000) for a in range(8)}) > 1  # the attempts differ


def test_bad_image_is_replaced_by_the_same_seeded_stand_in(
    digits_with_bad: tuple[Path, Path], mcfg: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    root, bad = digits_with_bad
    first, second = train_set(root, mcfg), train_set(root, mcfg)
    i = index_of(first, bad)
    j = stand_in_index(0, i, 0, len(first))
    x1, y1 = first[i]
    x2, y2 = second[i]
    xj, yj = second[j]
    assert torch.equal(x1, x2) and y1 == y2
    assert torch.equal(x1, xj) and y1 == yj  # the stand-in's own label comes with it
    assert first.bad_count() == 1 and first.bad_paths() == [str(bad)]
    assert second.bad_count() == 1
    assert f"cannot decode train image {i}: {bad}" in caplog.text
    assert f"using image {j} ({second.samples[j][0]}) in its place" in caplog.text
    warned = [r.levelno for r in caplog.records if str(bad) in r.getMessage()]
    assert warned == [logging.WARNING] * 2  # once per dataset
    first[i]  # failing again is neither a second count nor a second warning
    assert first.bad_count() == 1 and caplog.text.count(f"image {i}: {bad}") == 2


def test_a_bad_stand_in_moves_on_to_the_next_attempt(
    digits_with_bad: tuple[Path, Path], mcfg: dict[str, object]
) -> None:
    root, bad = digits_with_bad
    clean = train_set(root, mcfg)
    n, i = len(clean), 0
    j, k = stand_in_index(0, i, 0, n), stand_in_index(0, i, 1, n)
    assert k not in (i, j)  # else pick another i: the seeded picks are fixed
    samples = list(clean.samples)
    samples[i], samples[j] = (str(bad), 0), (str(bad), 1)
    ds = ImageListDataset(samples, clean.transform, seed=0)
    x, y = ds[i]
    xk, yk = clean[k]
    assert torch.equal(x, xk) and y == yk
    assert ds.bad_count() == 2


def test_all_stand_ins_bad_is_a_data_error(
    digits_with_bad: tuple[Path, Path], mcfg: dict[str, object]
) -> None:
    root, bad = digits_with_bad
    ds = ImageListDataset([(str(bad), 0)] * 3, train_set(root, mcfg).transform, split="val")
    with pytest.raises(
        ConfigError, match=r"data\.maxBadFraction: val image .* stand-ins tried for it all failed"
    ):
        ds[0]
    assert ds.bad_count() == 3


def test_flags_set_in_worker_processes_are_seen_by_the_main_process(
    digits_with_bad: tuple[Path, Path], mcfg: dict[str, object]
) -> None:
    root, bad = digits_with_bad
    ds = train_set(root, mcfg)
    n = len(ds)
    batches = [list(range(s, min(s + 64, n))) for s in range(0, n, 64)]
    xs = torch.cat([x for x, _ in make_loader(ds, batches, num_workers=2, seed=0, epoch=3)])  # type: ignore[arg-type]
    assert ds.bad_count() == 1 and ds.bad_paths() == [str(bad)] and ds.epoch == 3
    i = index_of(ds, bad)
    fresh = train_set(root, mcfg)
    assert torch.equal(xs[i], fresh[i][0])
    assert torch.equal(xs[i], xs[stand_in_index(0, i, 0, n)])


def test_check_bad_raises_above_the_fraction_only(
    tmp_path: Path, digits_with_bad: tuple[Path, Path], mcfg: dict[str, object]
) -> None:
    root, bad = digits_with_bad
    ds = train_set(root, mcfg)
    ds[index_of(ds, bad)]
    n = len(ds)
    check_bad(ds, 0.01, "train")  # 1 of ~540
    check_bad(ds, 1 / n, "train")  # exactly the fraction is allowed
    with pytest.raises(ConfigError) as e:
        check_bad(ds, 0.0, "train")
    msg = str(e.value)
    assert msg.startswith(
        f"data.maxBadFraction: 1 of {n} train images failed to decode, more than the 0 allowed"
    )
    assert str(bad) in msg and msg.endswith("remove or replace these files, or raise data.maxBadFraction")
    check_bad(ds, 0.01, "train", count=5)
    with pytest.raises(ConfigError, match=r"data\.maxBadFraction: 6 of"):
        check_bad(ds, 0.01, "train", count=6)  # under DDP the loop passes the all-reduced count
    check_bad(None, 0.0, "val")
    check_bad(SyntheticDataset([0, 1], 2, 8, 0), 0.0, "train")

    many = [write_truncated_jpeg(tmp_path / f"bad{i}.jpg", i) for i in range(8)]
    good = [(p, 0) for p, _ in ds.samples[:92]]
    mixed = ImageListDataset([(str(p), 0) for p in many] + good, ds.transform)
    for i in range(len(many)):
        mixed[i]
    assert mixed.bad_count() == 8
    check_bad(mixed, 0.08, "train")
    with pytest.raises(ConfigError) as e:
        check_bad(mixed, 0.05, "train")
    assert ", ".join(map(str, many[:5])) + " and 3 more;" in str(e.value)


@pytest.mark.timeout(300)
def test_one_truncated_jpeg_is_logged_and_the_run_completes(
    tmp_path: Path, job_factory: Callable[..., Job]
) -> None:
    train = write_digits(tmp_path / "d" / "train", range(2))
    bad = write_truncated_jpeg(train / "1" / "truncated.jpg")
    pngs = sorted(train.rglob("*.png"))
    for p in pngs[: (len(pngs) + 1) % 8]:  # no partial last batch: one epoch loads every image
        p.unlink()
    shutil.copytree(train / "0", tmp_path / "d" / "val" / "0")
    spec = tiny_spec(
        data={"format": "imagefolder", "path": str(tmp_path / "d"), "numWorkers": 2},
        training={"maxSteps": None, "epochs": 1},
    )
    job = job_factory(spec)
    assert job.run() == 0, job.log_text()  # before: exit 1, OSError: image file is truncated
    warnings = [line for line in job.log_text().splitlines() if " WARNING " in line and str(bad) in line]
    assert any("cannot decode train image" in w for w in warnings), job.log_text()
    term = job.termination()
    assert term["reason"] == "Completed", term
    assert term["badImages"] == 1, term  # the loop's wiring


@pytest.mark.timeout(300)
def test_many_truncated_jpegs_exit_2_naming_max_bad_fraction(
    tmp_path: Path, job_factory: Callable[..., Job]
) -> None:
    root = write_digits(tmp_path / "d", range(2))
    bad = [write_truncated_jpeg(root / str(i % 2) / f"truncated{i}.jpg", i) for i in range(40)]  # ~10%
    spec = tiny_spec(data={"format": "imagefolder", "path": str(root), "numWorkers": 2})
    job = job_factory(spec)
    assert job.run() == 2, job.log_text()
    term = job.termination()
    assert term["reason"] == "InvalidConfig", term
    msg = term["message"]
    assert msg.startswith("data.maxBadFraction: ") and " train images failed to decode" in msg, msg
    assert any(str(p) in msg for p in bad) and "raise data.maxBadFraction" in msg, msg
