"""training.mixup: timm's Mixup seeded from (seed, step, micro-batch, rank), and a resumed run that
augments, samples balanced and mixes ending bitwise equal to an uninterrupted one."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kubetune_trainer.config import ConfigError, MixupConfig, TrainingConfig, parse_spec
from kubetune_trainer.mixing import Mixer, build_mixer, training_criterion
from kubetune_trainer.runtime import Runtime
from kubetune_trainer.stop import STOP

from .helpers import tiny_spec, write_digits

pytestmark = pytest.mark.trainer

CLASSES = 5
BOTH = MixupConfig(mixupAlpha=0.8, cutmixAlpha=1.0, switchProb=0.5)


def batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % CLASSES


def mix(mixer: Mixer, epoch: int = 0, step: int = 1, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch()
    return mixer(x, y, epoch=epoch, step=step, micro=micro)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_same_seed_step_micro_rank_gives_the_same_mix(mode: str) -> None:
    cfg = MixupConfig(mixupAlpha=0.8, cutmixAlpha=1.0, mode=mode)
    a, b = Mixer(cfg, CLASSES, 0.1, seed=3, rank=0), Mixer(cfg, CLASSES, 0.1, seed=3, rank=0)
    xa, ta = mix(a, step=4, micro=1)
    xb, tb = mix(b, step=4, micro=1)
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert ta.shape == (8, CLASSES) and torch.allclose(ta.sum(1), torch.ones(8))
    others = [
        mix(a, step=5, micro=1),
        mix(a, step=4, micro=0),
        mix(Mixer(cfg, CLASSES, 0.1, 3, rank=1), step=4),
    ]
    assert all(not torch.equal(xa, x) for x, _ in others)
    assert not torch.equal(xa, batch()[0])  # it did mix


def test_global_rng_states_are_untouched() -> None:
    np.random.seed(9)
    random.seed(9)
    torch.manual_seed(9)
    expected = (np.random.rand(), random.random(), torch.rand(2))
    np.random.seed(9)
    random.seed(9)
    torch.manual_seed(9)
    mixer = Mixer(BOTH, CLASSES, 0.0, seed=0, rank=0)
    for step in range(1, 6):
        mix(mixer, step=step)
    got = (np.random.rand(), random.random(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_off_epoch_stops_mixing_but_keeps_smoothed_targets() -> None:
    mixer = Mixer(MixupConfig(offEpoch=2), CLASSES, 0.1, seed=0, rank=0)
    assert mixer.active(0) and mixer.active(1) and not mixer.active(2) and not mixer.active(7)
    x, t = mix(mixer, epoch=2)
    x0, y0 = batch()
    assert torch.equal(x, x0)
    off, on = 0.1 / CLASSES, 1 - 0.1 + 0.1 / CLASSES
    assert torch.allclose(t, nn.functional.one_hot(y0, CLASSES) * (on - off) + off)
    assert not torch.equal(mix(mixer, epoch=1)[0], x0)
    assert Mixer(MixupConfig(), CLASSES, 0.0, 0, 0).active(10**5)  # offEpoch 0: never off


def test_criterion_and_mixer_follow_training_mixup() -> None:
    from timm.loss import SoftTargetCrossEntropy

    assert build_mixer(TrainingConfig(), CLASSES, 0) is None
    plain = training_criterion(TrainingConfig(labelSmoothing=0.1))
    assert isinstance(plain, nn.CrossEntropyLoss) and plain.label_smoothing == 0.1
    t = TrainingConfig(mixup=BOTH, labelSmoothing=0.1, seed=4)
    assert isinstance(training_criterion(t), SoftTargetCrossEntropy)
    mixer = build_mixer(t, CLASSES, rank=2)
    assert mixer is not None and (mixer.seed, mixer.rank) == (4, 2)
    assert mixer._mixup.label_smoothing == 0.1 and mixer._mixup.num_classes == CLASSES


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_odd_batch_is_a_config_error_naming_batch_size(mode: str) -> None:
    spec = tiny_spec(training={"batchSize": 7, "mixup": {"mode": mode}})
    with pytest.raises(
        ConfigError, match=r"^training\.batchSize: training\.mixup .*set training\.batchSize to 8"
    ):
        parse_spec(spec)
    parse_spec(tiny_spec(training={"batchSize": 8, "mixup": {"mode": mode}}))


def test_bad_mixup_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^training\.mixup: mixupAlpha and cutmixAlpha are both 0"):
        parse_spec(tiny_spec(training={"mixup": {"mixupAlpha": 0, "cutmixAlpha": 0}}))
    with pytest.raises(ConfigError, match=r"^training\.mixup\.mode:"):
        parse_spec(tiny_spec(training={"mixup": {"mode": "pairs"}}))


# -- the promise, end to end (in process) -----------------------------------------------------------------
def small_digits(root: Path, per_class: int = 24) -> Path:
    write_digits(root, range(2))
    for folder in root.iterdir():
        for extra in sorted(folder.glob("*.png"))[per_class:]:
            extra.unlink()
    return root


def train(spec: dict[str, Any], ckpt: Path, stop_at: int | None = None) -> int:
    """Run the Trainer in this process, stopping (as on SIGTERM) after step `stop_at`; returns its exit code."""
    from kubetune_trainer.loop import Trainer

    trainer = Trainer(parse_spec(spec), ckpt, Runtime())
    try:
        for step in trainer.steps():
            if step == stop_at:
                STOP.set()
    finally:
        STOP.clear()
    assert trainer.outcome is not None
    trainer.close(trainer.outcome.exit_code)
    return trainer.outcome.exit_code


def test_resumed_run_with_augment_balanced_and_mixup_is_bitwise_equal(tmp_path: Path) -> None:
    data = small_digits(tmp_path / "digits")  # 36 train samples: 4 steps per epoch, offEpoch inside the run
    spec = tiny_spec(
        data={
            "format": "imagefolder",
            "path": str(data),
            "valFraction": 0.25,
            "sampling": "balanced",
            "augment": {"autoAugment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "hflip": 0.0},
        },
        training={
            "maxSteps": 10,
            "batchSize": 4,
            "gradAccumulation": 2,
            "labelSmoothing": 0.1,
            "mixup": {"mode": "elem", "offEpoch": 2},
        },
        tensorboard={"enabled": False},
    )
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        assert train(spec, tmp_path / "ref") == 0
        assert train(spec, tmp_path / "run", stop_at=5) == 143
        spec["data"]["numWorkers"] = 2  # a resume may change it; the samples must not
        assert train(spec, tmp_path / "run") == 0
    finally:
        torch.use_deterministic_algorithms(previous)
    ref, run = (tmp_path / d / "final" / "model.safetensors" for d in ("ref", "run"))
    assert ref.read_bytes() == run.read_bytes()
    shutil.rmtree(tmp_path / "digits")
