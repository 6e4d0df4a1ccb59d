"""The export loads the timm way (create_model + resolve_model_data_config + create_transform) and scores
what the trainer scored, at an image size that is not the model's default."""

from __future__ import annotations

import ast
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config, resolve_model_data_config

from kubetune_trainer import data as data_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer.export import HUB_KEYS, export_final

from .helpers import Job, write_digits

pytestmark = pytest.mark.trainer

IMAGE_SIZE = 32  # test_resnet's pretrained input size is 160: the export must say 32


@dataclass(frozen=True)
class DigitsRun:
    final: Path
    val: Path
    eval_top1: float
    """The trainer's last `eval at step N` top-1 (logged rounded to 4 places)."""
    val_images: int


def digits_run(root: Path) -> DigitsRun:
    """test_resnet trained on digits (train/ + val/) at 32 px through the real CLI; once per pytest session."""
    data = root / "digits"
    if not (root / "job" / "termination-log").is_file():
        shutil.rmtree(root, ignore_errors=True)
        write_digits(data / "all")
        for cls in sorted((data / "all").iterdir()):
            for i, png in enumerate(sorted(cls.glob("*.png"))):
                dest = data / ("val" if i % 5 == 0 else "train") / cls.name / png.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                png.rename(dest)
        shutil.rmtree(data / "all")
        (root / "job").mkdir(parents=True)
        spec = {
            "model": {"name": "test_resnet"},
            "data": {"path": str(data), "imageSize": IMAGE_SIZE, "numWorkers": 0},
            "training": {"epochs": 2, "batchSize": 32, "learningRate": 0.01, "warmupSteps": 10},
            "checkpoint": {"everySteps": 0},
            "metrics": {"port": 0},
        }
        job = Job(root / "job", spec, "digits")
        assert job.run(timeout=500) == 0, job.log_text()
    job_root = root / "job"
    term = Job.termination_of(job_root / "termination-log")
    assert term["reason"] == "Completed", term
    log = (job_root / "trainer.log").read_text()
    evals = re.findall(r"eval at step \d+ \(epoch \d+\): (\{.*\})", log)
    assert evals, log
    top1 = float(ast.literal_eval(evals[-1])["eval_top1"])
    assert f"eval top-1 {top1:.4f}" in term["message"], term
    val_images = sum(1 for _ in (data / "val").rglob("*.png"))
    return DigitsRun(job_root / "ckpt" / "final", data / "val", top1, val_images)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    return digits_run(tmp_path_factory.getbasetemp() / "digits-export-run")


def load_the_timm_way(final: Path) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The user recipe of kubetune_trainer.export's docstring, verbatim."""
    cfg = json.loads((final / "config.json").read_text())
    model = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        num_classes=cfg["num_classes"],
        pretrained_cfg_overlay=cfg["pretrained_cfg"] | {"file": str(final / "model.safetensors")},
    ).eval()
    transform = create_transform(**resolve_model_data_config(model))
    return model, transform, cfg


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_export_loads_the_timm_way_with_the_trainers_top1(run: DigitsRun) -> None:
    assert run.eval_top1 >= 0.5, run  # 10 classes: well above chance
    model, transform, cfg = load_the_timm_way(run.final)
    correct = n = 0
    with torch.inference_mode():
        for cls in sorted(run.val.iterdir()):
            paths = sorted(cls.glob("*.png"))
            batch = []
            for p in paths:
                with Image.open(p) as img:
                    batch.append(transform(img.convert("RGB")))
            pred = model(torch.stack(batch)).argmax(dim=1)
            correct += int((pred == cfg["label_names"].index(cls.name)).sum())
            n += len(paths)
    assert n == run.val_images
    # the log has 4 decimals; 1/n is far coarser, so the counts are equal
    assert correct == round(run.eval_top1 * n), (correct, n, run.eval_top1)
    assert round(correct / n, 4) == run.eval_top1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_exported_config_states_the_trained_transform(run: DigitsRun) -> None:
    cfg = json.loads((run.final / "config.json").read_text())
    pcfg = cfg["pretrained_cfg"]
    assert cfg["architecture"] == "test_resnet" and cfg["num_classes"] == 10
    assert cfg["label_names"] == pcfg["label_names"] == [str(i) for i in range(10)]
    assert not set(HUB_KEYS) & set(pcfg), pcfg
    assert pcfg["input_size"] == pcfg["test_input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert pcfg["test_crop_pct"] == pcfg["crop_pct"]
    assert pcfg["classifier"] == "fc" and pcfg["first_conv"]
    want = data_mod.eval_data_config(model_mod.data_config("test_resnet"), IMAGE_SIZE)
    model, _, _ = load_the_timm_way(run.final)
    for use_test_size in (False, True):
        got = resolve_model_data_config(model, use_test_size=use_test_size)
        assert normalised(got) == normalised(want)
    weights = load_file(str(run.final / "model.safetensors"))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def normalised(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in d.items()}


def build(name: str, num_classes: int, size: int) -> torch.nn.Module:
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    registry = timm.models.get_pretrained_cfg(name)
    if registry is not None and registry.fixed_input_size:
        kwargs["img_size"] = size  # as model.build_model does
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def export(model: torch.nn.Module, name: str, out: Path, size: int, classes: list[str]) -> Path:
    eval_cfg = data_mod.eval_data_config(model_mod.data_config(name), size)
    pcfg = dict(model.pretrained_cfg)  # type: ignore[arg-type]
    export_final(out, model.state_dict(), name, pcfg, eval_cfg, classes, len(classes))
    return out


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"])
def test_every_test_model_reloads_at_its_trained_size(tmp_path: Path, name: str) -> None:
    classes = ["ant", "bee", "cat"]
    trained = build(name, 3, IMAGE_SIZE)
    final = export(trained, name, tmp_path / "final", IMAGE_SIZE, classes)
    loaded, transform, _ = load_the_timm_way(final)
    want = data_mod.eval_data_config(model_mod.data_config(name), IMAGE_SIZE)
    assert normalised(resolve_model_data_config(loaded)) == normalised(want)
    assert normalised(resolve_model_data_config(loaded, use_test_size=True)) == normalised(want)
    assert loaded.pretrained_cfg["label_names"] == classes  # type: ignore[index]
    img = Image.fromarray((torch.rand(48, 40, 3) * 255).to(torch.uint8).numpy())
    x = transform(img).unsqueeze(0)
    assert x.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    with torch.inference_mode():
        assert torch.equal(loaded(x), trained(x))


def test_registry_keys_that_would_misload_are_overridden(tmp_path: Path) -> None:
    """A registry cfg with a test size, label offset and custom loader: the export states its own values."""
    trained = build("test_resnet", 3, IMAGE_SIZE)
    pcfg = dict(trained.pretrained_cfg) | {  # type: ignore[arg-type]
        "url": "https://example.invalid/w.pth",
        "hf_hub_id": "timm/nowhere",
        "hf_hub_filename": "w.bin",
        "test_input_size": (3, 288, 288),
        "test_crop_pct": 1.0,
        "label_offset": 1,
        "custom_load": True,
        "pool_size": (5, 5),
        "test_pool_size": (9, 9),
    }
    eval_cfg = data_mod.eval_data_config(model_mod.data_config("test_resnet"), IMAGE_SIZE)
    final = tmp_path / "final"
    export_final(final, trained.state_dict(), "test_resnet.r160_in1k", pcfg, eval_cfg, ["a", "b", "c"], 3)
    exported = json.loads((final / "config.json").read_text())["pretrained_cfg"]
    assert not set(HUB_KEYS) & set(exported)
    assert exported["test_input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert normalised(resolve_data_config(pretrained_cfg=exported, use_test_size=True)) == normalised(
        eval_cfg
    )
    # laid over that registry cfg (the recipe's overlay), it still loads our weights unchanged
    model = timm.create_model(
        "test_resnet",
        pretrained=True,
        num_classes=3,
        pretrained_cfg=pcfg,
        pretrained_cfg_overlay=exported | {"file": str(final / "model.safetensors")},
    )
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    merged: dict[str, Any] = model.pretrained_cfg  # type: ignore[assignment]
    assert "url" in merged  # the overlay never removes keys: they are harmless with `file`


def test_export_is_byte_deterministic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    trained = build("test_resnet", 3, IMAGE_SIZE)
    a = export(trained, "test_resnet", tmp_path / "a", IMAGE_SIZE, ["x", "y", "z"])
    b = export(trained, "test_resnet", tmp_path / "b", IMAGE_SIZE, ["x", "y", "z"])
    for f in ("model.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["config.json", "model.safetensors"]


def test_local_dir_loading_agrees_when_timm_has_it(tmp_path: Path) -> None:
    """timm >= 1.0.20 also reads the folder itself: `create_model("local-dir:<final>", pretrained=True)`."""
    trained = build("test_resnet", 3, IMAGE_SIZE)
    final = export(trained, "test_resnet", tmp_path / "final", IMAGE_SIZE, ["x", "y", "z"])
    try:
        model = timm.create_model(f"local-dir:{final}", pretrained=True).eval()
    except RuntimeError as e:
        if "local-dir" in str(e) or "Unknown model" in str(e):
            pytest.skip(f"timm {timm.__version__} has no local-dir: source")
        raise
    want = data_mod.eval_data_config(model_mod.data_config("test_resnet"), IMAGE_SIZE)
    assert normalised(resolve_model_data_config(model)) == normalised(want)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
