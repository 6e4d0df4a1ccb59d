"""`kubetune-predict`: scores the val split as the trainer did, writes parseable CSV/JSON, exits 2 on bad input."""

from __future__ import annotations

import csv
import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from PIL import Image

from kubetune_trainer import predict

from .helpers import trainer_env
from .test_export import DigitsRun, build, digits_run, export

pytestmark = pytest.mark.trainer

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    # the same directory as test_export's fixture: one training per pytest session
    return digits_run(tmp_path_factory.getbasetemp() / "digits-export-run")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained test_resnet for 3 classes, exported at 32 px: enough to test the command's plumbing."""
    return export(
        build("test_resnet", 3, 32), "test_resnet", tmp_path_factory.mktemp("tiny") / "final", 32, CLASSES
    )


def image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()).save(path)
    return path


def labelled_folder(root: Path, per_class: int = 2) -> Path:
    for c in CLASSES:
        for i in range(per_class):
            image(root / c / f"{i}.png", seed=10 * CLASSES.index(c) + i)
    return root


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_predict_scores_the_val_split_as_the_trainer_did(run: DigitsRun, tmp_path: Path) -> None:
    out = tmp_path / "pred.json"
    argv = [sys.executable, "-m", "kubetune_trainer.predict", str(run.final), str(run.val)]
    proc = subprocess.run(
        [*argv, "--format", "json", "-o", str(out), "--batch-size", "50"],
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    preds = doc["predictions"]
    assert len(preds) == run.val_images
    top1 = sum(p["label"] == p["true_label"] for p in preds) / len(preds)
    assert round(top1, 4) == run.eval_top1 == round(doc["scores"]["top1"], 4)
    assert doc["scores"]["images"] == run.val_images and doc["scores"]["top5"] >= top1
    assert set(doc["scores"]["per_class"]) == {str(i) for i in range(10)}
    for p in preds:
        assert Path(p["path"]).parent.name == p["true_label"]
        assert len(p["top_k"]) == 5 and p["top_k"][0] == {
            "label": p["label"],
            "probability": p["probability"],
        }
        probs = [t["probability"] for t in p["top_k"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    assert f"top-1 {run.eval_top1:.4f}" in proc.stderr  # the readable table
    assert "class" in proc.stderr and "images" in proc.stderr


def test_csv_has_the_fields_and_true_labels(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = labelled_folder(tmp_path / "val")
    assert predict.main([str(tiny), str(folder), "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 6
    assert list(rows[0]) == [
        "path",
        "true_label",
        "label",
        "probability",
        "top1_label",
        "top1_probability",
        "top2_label",
        "top2_probability",
    ]
    for r in rows:
        assert r["true_label"] == Path(r["path"]).parent.name
        assert r["label"] == r["top1_label"] in CLASSES and r["top2_label"] in CLASSES
        assert 1 >= float(r["top1_probability"]) >= float(r["top2_probability"]) >= 0
    assert "scored 6 images: top-1" in err
    for c in CLASSES:
        assert any(line.split()[:2] == [c, "2"] for line in err.splitlines()), err


def test_unlabelled_inputs_json_to_file(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = image(tmp_path / "loose" / "deep" / "er" / "a.jpg")
    b = image(tmp_path / "single.png", seed=1)
    (tmp_path / "loose" / "notes.txt").write_text("not an image; skipped by extension in folders")
    out = tmp_path / "out" / "p.json"
    assert predict.main([str(tiny), str(tmp_path / "loose"), str(b), "--format", "json", "-o", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [p["path"] for p in doc["predictions"]] == [str(a), str(b)]
    assert doc["scores"] is None and all("true_label" not in p for p in doc["predictions"])
    assert all(len(p["top_k"]) == 3 for p in doc["predictions"])  # --top-k 5 capped at 3 classes
    assert "scored" not in capsys.readouterr().err


def test_the_export_as_predict_loads_it_matches_the_trained_model(tiny: Path) -> None:
    loaded = predict.load_export(tiny, "cpu")
    assert loaded.labels == CLASSES
    assert tuple(loaded.data_cfg["input_size"]) == (3, 32, 32)
    trained = build("test_resnet", 3, 32)
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), trained(x))


def test_corrupt_image_is_skipped_with_a_warning(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    folder = labelled_folder(tmp_path / "val")
    bad = folder / "bee" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    caplog.set_level(logging.WARNING)
    assert predict.main([str(tiny), str(folder), "--format", "json", "--batch-size", "4"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["predictions"]) == 6 and str(bad) not in {p["path"] for p in doc["predictions"]}
    assert f"skipping unreadable image {bad}" in caplog.text


def test_no_readable_image_exits_2(tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert predict.main([str(tiny), str(text)]) == 2
    assert f"skipping unreadable image {text}" in caplog.text and "none of the 1 images" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict.main([str(tiny), str(empty)]) == 2
    assert f"no images in {empty}" in caplog.text
    assert predict.main([str(tiny), str(tmp_path / "absent.png")]) == 2
    assert f"input {tmp_path / 'absent.png'} does not exist" in caplog.text


def test_bad_model_dirs_exit_2_naming_the_path_and_fix(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    img = str(image(tmp_path / "x.png"))
    missing = tmp_path / "runs" / "final"
    assert predict.main([str(missing), img]) == 2
    assert f"model dir {missing} does not exist" in caplog.text and "<checkpoint-dir>/final" in caplog.text

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "step-00000010.pt").write_bytes(b"x")
    assert predict.main([str(checkpoints), img]) == 2
    assert f"{checkpoints} has no config.json" in caplog.text

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes((tiny / "model.safetensors").read_bytes())
    (broken / "config.json").write_text("{not json")
    assert predict.main([str(broken), img]) == 2
    assert f"{broken / 'config.json'} is not a kubetune export's config" in caplog.text

    (broken / "config.json").write_text((tiny / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"truncated")
    assert predict.main([str(broken), img]) == 2
    assert f"cannot load {broken / 'model.safetensors'}" in caplog.text

    # the config.json or weights file itself works as well as its folder
    assert predict.main([str(tiny / "config.json"), img]) == 0


def test_unknown_class_folders_exit_2(tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = labelled_folder(tmp_path / "val")
    image(folder / "dog" / "0.png")
    assert predict.main([str(tiny), str(folder)]) == 2  # auto: most folders are classes, one is not
    assert f"{folder}: class folders ['dog'] are not among the model's labels" in caplog.text
    assert "--no-labelled" in caplog.text
    assert predict.main([str(tiny), str(folder), "--no-labelled"]) == 0

    other = tmp_path / "photos"
    image(other / "2024" / "a.png")
    assert predict.main([str(tiny), str(other)]) == 0  # no folder is a class: just classified
    caplog.clear()
    assert predict.main([str(tiny), str(other), "--labelled"]) == 2
    assert "class folders ['2024']" in caplog.text


def test_help_imports_neither_torch_nor_timm() -> None:
    code = (
        "import sys; from kubetune_trainer import predict\n"
        "try:\n    predict.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=trainer_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "kubetune-predict" in proc.stdout and "--labelled" in proc.stdout
    script = Path(sys.executable).parent / "kubetune-predict"  # pyproject's [project.scripts]
    if script.exists():
        proc = subprocess.run(
            [script, "--help"], env=trainer_env(), capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0 and "--top-k" in proc.stdout, proc.stderr


def test_timm_is_the_loader(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict builds the model through timm.create_model with the export's overlay, nothing else."""
    calls: list[dict[str, Any]] = []
    real = timm.create_model

    def spy(name: str, **kwargs: Any) -> torch.nn.Module:
        calls.append({"name": name, **kwargs})
        return real(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    predict.load_export(tiny, "cpu")
    cfg = json.loads((tiny / "config.json").read_text())
    assert calls == [
        {
            "name": "test_resnet",
            "pretrained": True,
            "num_classes": 3,
            "pretrained_cfg_overlay": cfg["pretrained_cfg"] | {"file": str(tiny / "model.safetensors")},
        }
    ]
