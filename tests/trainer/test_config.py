"""Spec parsing and validation: defaults in one place, every error names the field path."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer import config as c

pytestmark = pytest.mark.unit

BASE = {"model": {"name": "test_resnet"}, "data": {"format": "synthetic"}}


def spec_with(section: str, **values: object) -> dict[str, object]:
    spec = {k: dict(v) for k, v in BASE.items()}
    spec.setdefault(section, {}).update(values)
    return spec


def test_defaults() -> None:
    cfg = c.parse_spec({"model": {"name": "resnet50"}, "data": {"path": "/data"}})
    assert cfg.data.format == "imagefolder"
    assert cfg.training.batchSize == 32 and cfg.training.learningRate == 0.001
    assert cfg.training.optimizer == "adamw" and cfg.training.scheduler == "cosine"
    assert cfg.training.epochs is None and cfg.training.maxSteps is None
    assert cfg.checkpoint.everySteps == 100 and cfg.checkpoint.keepLast == 2
    assert cfg.wandb.mode == "disabled" and cfg.metrics.port == 9400
    assert cfg.model.freeze == "none" and cfg.data.valFraction == 0.1


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("training", {"batchSize": -1}, "training.batchSize: must be > 0, got -1"),
        ("training", {"batchSize": 0}, "training.batchSize: must be > 0"),
        ("training", {"batchSize": "32"}, "training.batchSize: must be an integer"),
        ("training", {"learningRate": 0}, "training.learningRate: must be > 0"),
        ("training", {"learningRate": True}, "training.learningRate: must be a number"),
        ("training", {"optimizer": "adam"}, "training.optimizer: must be one of adamw, sgd"),
        ("training", {"scheduler": "linear"}, "training.scheduler: must be one of"),
        ("training", {"precision": "fp8"}, "training.precision: must be one of"),
        ("training", {"epochs": 2, "maxSteps": 5}, "training.maxSteps: set either"),
        ("training", {"epochs": 0}, "training.epochs: must be > 0"),
        ("training", {"gradAccumulation": 0}, "training.gradAccumulation: must be > 0"),
        ("training", {"labelSmoothing": 1.5}, "training.labelSmoothing"),
        ("training", {"gradClip": -1.0}, "training.gradClip: must be >= 0"),
        ("training", {"warmupSteps": -3}, "training.warmupSteps: must be >= 0"),
        ("training", {"deterministic": "yes"}, "training.deterministic: must be true or false"),
        ("checkpoint", {"keepLast": 1}, "checkpoint.keepLast: must be >= 2"),
        ("checkpoint", {"everySteps": -5}, "checkpoint.everySteps: must be >= 0"),
        ("data", {"format": "csv"}, "data.format: must be one of imagefolder, synthetic"),
        ("data", {"valFraction": 1.0}, "data.valFraction"),
        ("data", {"numWorkers": -1}, "data.numWorkers: must be >= 0"),
        ("data", {"imageSize": 0}, "data.imageSize: must be > 0"),
        ("model", {"numClasses": 0}, "model.numClasses: must be > 0"),
        ("model", {"freeze": "head"}, "model.freeze: must be none, backbone or a list"),
        ("model", {"freeze": []}, "model.freeze: must be a string or a non-empty list"),
        ("model", {"name": ""}, "model.name: required"),
        ("wandb", {"mode": "on"}, "wandb.mode: must be one of"),
        ("wandb", {"tags": "a"}, "wandb.tags: must be a list of strings"),
        ("metrics", {"port": 70000}, "metrics.port"),
    ],
)
def test_bad_values_name_the_field(section: str, values: dict[str, object], message: str) -> None:
    with pytest.raises(c.ConfigError) as err:
        c.parse_spec(spec_with(section, **values))
    assert message in str(err.value)


def test_unknown_fields_suggest_the_right_name() -> None:
    with pytest.raises(
        c.ConfigError, match=r"spec.training.learningrate: unknown field; did you mean learningRate\?"
    ):
        c.parse_spec(spec_with("training", learningrate=0.1))
    with pytest.raises(c.ConfigError, match=r"spec.trainng: unknown field; did you mean training\?"):
        c.parse_spec({**BASE, "trainng": {}})


def test_imagefolder_needs_a_path() -> None:
    with pytest.raises(c.ConfigError, match=r"data\.path: required"):
        c.parse_spec({"model": {"name": "x"}})


def test_operator_only_fields_are_accepted() -> None:
    spec = {
        **spec_with("checkpoint", storage="5Gi", existingClaim="pvc", retainOnDelete=True),
        "image": "img",
        "workers": 2,
        "resources": {"limits": {}},
        "runPolicy": {"backoffLimit": 3},
        "wandb": {"apiKeySecretRef": {"name": "s", "key": "k"}},
    }
    spec["data"] = {"format": "synthetic", "claimName": "data"}
    cfg = c.parse_spec(spec)
    assert cfg.checkpoint.keepLast == 2


def test_manifest_overrides_and_env(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: demo}\n"
        "spec:\n  model: {name: test_vit}\n  data: {path: /nowhere}\n"
    )
    cfg = c.load_job(
        path, ["training.epochs=3", "model.freeze=[blocks]"], env={"KUBETUNE_DATA_PATH": "/data"}
    )
    assert cfg.name == "demo" and cfg.training.epochs == 3
    assert cfg.model.freeze == ("blocks",) and cfg.data.path == "/data"
    bare = tmp_path / "bare.yaml"
    bare.write_text("model: {name: test_vit}\ndata: {format: synthetic}\n")
    assert c.load_job(bare, env={}).name == "local"
    with pytest.raises(c.ConfigError, match="--set training: expected FIELD=VALUE"):
        c.load_job(bare, ["training"], env={})


def test_trainer_fields_and_defaults_are_exported() -> None:
    fields = c.trainer_fields()
    assert set(fields) == {"model", "data", "training", "checkpoint", "wandb", "metrics"}
    assert "batchSize" in fields["training"] and "keepLast" in fields["checkpoint"]
    defaults = c.field_defaults()
    assert defaults["training"]["batchSize"] == 32 and defaults["wandb"]["tags"] == []
    assert defaults["model"]["name"] is None


def test_resume_mismatch_names_the_field() -> None:
    old = c.parse_spec(spec_with("training", batchSize=8)).to_spec()
    assert c.resume_mismatch(old, c.parse_spec(spec_with("training", batchSize=8, maxSteps=50))) is None
    msg = c.resume_mismatch(old, c.parse_spec(spec_with("training", batchSize=16)))
    assert msg is not None and msg.startswith("training.batchSize: changed from 8 to 16")


def test_config_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, kubetune_trainer.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
