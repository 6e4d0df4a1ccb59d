"""Checkpointer: atomic writes, verification, fallback past torn/corrupt files, retention, disk errors."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from kubetune_trainer.checkpoint import Checkpointer, CheckpointError
from kubetune_trainer.config import CheckpointConfig

pytestmark = pytest.mark.unit


def state(step: int) -> dict[str, object]:
    return {
        "step": step,
        "epoch": 0,
        "w": torch.full((64, 64), float(step)),
        "opt": {"m": [torch.ones(3) * step]},
    }


def make(tmp_path: Path, keep: int = 2, every: int = 10, seconds: int = 0) -> Checkpointer:
    return Checkpointer(tmp_path, CheckpointConfig(everySteps=every, everySeconds=seconds, keepLast=keep))


def test_should_save_by_steps_and_seconds(tmp_path: Path) -> None:
    ck = make(tmp_path, every=10, seconds=30)
    assert ck.should_save(10) and not ck.should_save(11)
    assert ck.should_save(11, now=ck.last_save_time + 31)
    ck.save_sync(10, state(10))
    assert not ck.should_save(10)
    assert not make(tmp_path / "off", every=0).should_save(100)


def test_async_save_round_trips_and_snapshot_is_isolated(tmp_path: Path) -> None:
    ck = make(tmp_path)
    live = state(5)
    ck.save_async(5, live)
    live["w"].add_(100)  # type: ignore[union-attr]  # the training thread keeps going
    ck.wait()
    found = ck.find_latest_valid()
    assert found is not None and found.step == 5
    loaded = ck.load(found)
    assert torch.equal(loaded["w"], torch.full((64, 64), 5.0)) and loaded["opt"]["m"][0][0] == 5
    manifest = json.loads(found.path.with_suffix(".json").read_text())
    assert manifest["bytes"] == found.path.stat().st_size and len(manifest["sha256"]) == 64


def test_falls_back_past_torn_corrupt_and_manifestless(tmp_path: Path) -> None:
    ck = make(tmp_path, keep=5)
    for s in (1, 2, 3, 4):
        ck.save_sync(s, state(s))
    # step 4: torn (truncated); step 3: a flipped byte; step 5: written but killed before its manifest
    p4 = ck.path_for(4)
    p4.write_bytes(p4.read_bytes()[:100])
    p3 = ck.path_for(3)
    data = bytearray(p3.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p3.write_bytes(bytes(data))
    ck.path_for(5).write_bytes(ck.path_for(2).read_bytes())
    found = ck.find_latest_valid()
    assert found is not None and found.step == 2
    (ck.dir / "step-00000009.json").write_text("{not json")
    assert ck.find_latest_valid() == found


def test_temp_files_of_killed_writes_are_removed(tmp_path: Path) -> None:
    ck = make(tmp_path)
    ck.save_sync(1, state(1))
    tmp = ck.dir / f".step-00000002.pt.tmp-{os.getpid() + 1}"
    tmp.write_bytes(b"half")
    ck2 = make(tmp_path)
    assert not tmp.exists() and ck2.find_latest_valid() is not None


def test_keep_latest_k(tmp_path: Path) -> None:
    ck = make(tmp_path, keep=3)
    for s in range(1, 8):
        ck.save_async(s, state(s))
    ck.wait()
    assert sorted(p.name for p in ck.dir.glob("step-*")) == [
        f"step-{s:08d}.{ext}" for s in (5, 6, 7) for ext in ("json", "pt")
    ]


def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ck = make(tmp_path)
    ck.save_sync(1, state(1))

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    ck.save_async(2, state(2))
    with pytest.raises(
        CheckpointError, match=r"step 2: .*No space left on device.*step-00000001.pt is intact"
    ):
        ck.wait()
    monkeypatch.undo()
    found = ck.find_latest_valid()
    assert found is not None and found.step == 1
    assert not list(ck.dir.glob(".step-*"))  # no temp file left behind


def test_deferred_tensors_are_copied_before_the_caller_mutates_them(tmp_path: Path) -> None:
    ck = make(tmp_path)
    live = state(3)
    weight = live["w"]
    assert isinstance(weight, torch.Tensor)
    ck.save_async(3, live, deferred=lambda t: t.data_ptr() == weight.data_ptr())
    ck.wait_copied()  # what the optimizer pre-hook does before a step
    weight.add_(1000)
    ck.wait()
    found = ck.find_latest_valid()
    assert found is not None and torch.equal(ck.load(found)["w"], torch.full((64, 64), 3.0))
