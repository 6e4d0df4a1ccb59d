"""ImageFolder layouts: a flat folder split by valFraction, or explicit train/ and val/ folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kubetune_trainer.config import ConfigError, DataConfig
from kubetune_trainer.data import build_datasets
from kubetune_trainer.model import data_config

from .helpers import write_digits

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def mcfg() -> dict[str, object]:
    return data_config("test_resnet")


def test_flat_folder_is_split_by_val_fraction(tmp_path: Path, mcfg: dict[str, object]) -> None:
    root = write_digits(tmp_path / "d", range(3))
    n = sum(1 for _ in root.rglob("*.png"))
    b = build_datasets(DataConfig(path=str(root), imageSize=16, valFraction=0.25), None, mcfg, seed=0)
    assert b.classes == ["0", "1", "2"] and b.image_size == 16
    assert len(b.train) + len(b.val) == n and len(b.val) == round(n * 0.25)  # type: ignore[arg-type]
    x, y = b.train[0]
    assert tuple(x.shape) == (3, 16, 16) and y in (0, 1, 2)


def test_train_and_val_folders(tmp_path: Path, mcfg: dict[str, object]) -> None:
    write_digits(tmp_path / "d" / "train", range(3))
    val = tmp_path / "d" / "val"
    val.mkdir()
    shutil.copytree(tmp_path / "d" / "train" / "2", val / "2")  # val may hold a subset of the classes
    b = build_datasets(DataConfig(path=str(tmp_path / "d"), imageSize=16), None, mcfg, seed=0)
    assert b.classes == ["0", "1", "2"] and b.val is not None
    assert {label for _, label in b.val.samples} == {2}  # type: ignore[attr-defined]
    (val / "0").mkdir()  # an empty val class folder is the same as none: that class is not evaluated
    assert (
        build_datasets(DataConfig(path=str(tmp_path / "d"), imageSize=16), None, mcfg, seed=0).val is not None
    )
    shutil.copytree(val / "2", val / "7")
    with pytest.raises(ConfigError, match=r"data\.path: .*classes \['7'\] that are not in the training set"):
        build_datasets(DataConfig(path=str(tmp_path / "d"), imageSize=16), None, mcfg, seed=0)


def test_num_classes_below_found_classes(tmp_path: Path, mcfg: dict[str, object]) -> None:
    root = write_digits(tmp_path / "d", range(4))
    with pytest.raises(ConfigError, match=r"model\.numClasses: 2 is fewer than the 4 classes"):
        build_datasets(DataConfig(path=str(root), imageSize=16), 2, mcfg, seed=0)


def test_empty_class_folder_is_a_config_error_naming_it(tmp_path: Path, mcfg: dict[str, object]) -> None:
    root = write_digits(tmp_path / "d", range(3))
    (root / "7").mkdir()
    (root / "7" / "README.txt").write_text("not an image")
    with pytest.raises(ConfigError) as e:
        build_datasets(DataConfig(path=str(root), imageSize=16), None, mcfg, seed=0)
    assert str(e.value).startswith(f"data.path: class folders without readable images: {root / '7'};")
    (root / "7" / "x.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"without readable images: .*/7 \(1 unreadable\); add images"):
        build_datasets(DataConfig(path=str(root), imageSize=16, maxBadFraction=1.0), None, mcfg, seed=0)


def test_scan_threshold_is_max_bad_fraction_and_names_the_files(
    tmp_path: Path, mcfg: dict[str, object]
) -> None:
    root = write_digits(tmp_path / "d", range(3))
    broken = [root / "0" / f"broken{i}.png" for i in range(3)]
    for p in broken:
        p.write_bytes(b"not a png")
    b = build_datasets(DataConfig(path=str(root), imageSize=16), None, mcfg, seed=0)  # 3 of ~540 < 1%
    assert b.skipped_images == 3 and b.bad_images() == 0
    with pytest.raises(ConfigError) as e:
        build_datasets(DataConfig(path=str(root), imageSize=16, maxBadFraction=0.005), None, mcfg, seed=0)
    msg, total = str(e.value), sum(1 for _ in root.rglob("*.png"))
    assert msg.startswith(f"data.path: 3 of {total} images under {root} are unreadable")
    assert "more than the data.maxBadFraction of 0.005 allowed" in msg
    assert ", ".join(map(str, broken)) in msg and msg.endswith("or raise data.maxBadFraction")
