"""Real data: scikit-learn digits as an ImageFolder, fine-tuned on CPU, then a frozen-backbone transfer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from .helpers import Job, write_digits

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def digits_spec(path: Path, **training: object) -> dict[str, object]:
    return {
        "model": {"name": "test_resnet"},
        "data": {"path": str(path), "imageSize": 32, "numWorkers": 2, "valFraction": 0.2},
        "training": {"epochs": 3, "batchSize": 32, "learningRate": 0.01, "warmupSteps": 10, **training},
        "checkpoint": {"everySteps": 50},
        "metrics": {"port": 0},
    }


@pytest.mark.timeout(300)
def test_digits_reach_90_percent_and_export_loads_in_timm(
    tmp_path: Path, job_factory: Callable[..., Job]
) -> None:
    job = job_factory(digits_spec(write_digits(tmp_path / "digits")), "digits")
    assert job.run() == 0, job.log_text()
    term = job.termination()
    assert term["reason"] == "Completed", term
    top1 = float(term["message"].split("eval top-1 ")[1].split(";")[0])
    assert top1 >= 0.90, term

    final = job.ckpt / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["num_classes"] == 10 and cfg["label_names"] == [str(i) for i in range(10)]
    model = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        num_classes=10,
        pretrained_cfg_overlay=cfg["pretrained_cfg"] | {"file": str(final / "model.safetensors")},
    )
    weights = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


@pytest.mark.timeout(300)
def test_transfer_frozen_backbone_from_first_run(tmp_path: Path, job_factory: Callable[..., Job]) -> None:
    first = job_factory(digits_spec(write_digits(tmp_path / "low", range(5))), "low")
    assert first.run() == 0, first.log_text()
    source = first.ckpt / "final" / "model.safetensors"

    spec = digits_spec(write_digits(tmp_path / "high", range(5, 10)), learningRate=0.02, epochs=6)
    spec["model"] = {"name": "test_resnet", "weights": str(source), "freeze": "backbone"}
    second = job_factory(spec, "high")
    assert second.run() == 0, second.log_text()
    assert "trainable of" in second.log_text()
    term = second.termination()
    top1 = float(term["message"].split("eval top-1 ")[1].split(";")[0])
    assert top1 >= 0.80, term

    before, after = load_file(str(source)), load_file(str(second.ckpt / "final" / "model.safetensors"))
    backbone = [k for k in before if not k.startswith("fc.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)  # frozen, BN stats included
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    cfg = json.loads((second.ckpt / "final" / "config.json").read_text())
    assert cfg["label_names"] == ["5", "6", "7", "8", "9"]
