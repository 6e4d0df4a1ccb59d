"""Spec parsing and validation: defaults in one place, every error names the field path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        ("training", {"scheduler": "cosin"}, "training.scheduler: must be one of cosine, step, multistep"),
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
        ("data", {"imageSize": 0}, "data.imageSize: must be >= 8, got 0"),
        ("data", {"valFraction": 0.95}, "data.valFraction: must be <= 0.9, got 0.95"),
        ("training", {"learningRate": 11}, "training.learningRate: must be <= 10, got 11"),
        ("training", {"labelSmoothing": 1.0}, "training.labelSmoothing: must be < 1, got 1"),
        ("training", {"learningRate": "fast"}, "training.learningRate: must be a number"),
        ("data", {"maxBadFraction": 2}, "data.maxBadFraction: must be <= 1, got 2"),
        ("model", {"strictWeights": "no"}, "model.strictWeights: must be true or false"),
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
    assert set(fields) == {
        "model",
        "data",
        "training",
        "checkpoint",
        "wandb",
        "metrics",
        "tensorboard",
        "evaluation",
    }
    assert "batchSize" in fields["training"] and "keepLast" in fields["checkpoint"]
    defaults = c.field_defaults()
    assert defaults["training"]["batchSize"] == 32 and defaults["wandb"]["tags"] == []
    assert defaults["model"]["name"] is None


def test_resume_mismatch_names_the_field() -> None:
    old = c.parse_spec(spec_with("training", batchSize=8)).to_spec()
    assert c.resume_mismatch(old, c.parse_spec(spec_with("training", batchSize=8, maxSteps=50))) is None
    msg = c.resume_mismatch(old, c.parse_spec(spec_with("training", batchSize=16)))
    assert msg is not None and msg.startswith("training.batchSize: changed from 8 to 16")


@pytest.mark.parametrize(
    ("section", "values"),
    [
        ("training", {"learningRate": 0.01}),
        ("training", {"weightDecay": 0.0}),
        ("training", {"scheduler": "constant"}),
        ("training", {"warmupSteps": 5}),
        ("training", {"labelSmoothing": 0.1}),
        ("training", {"gradClip": 1.0}),
        ("training", {"precision": "fp32"}),
        ("training", {"deterministic": False}),
        ("model", {"weights": "/w.safetensors"}),
        ("data", {"imageSize": 64}),
    ],
)
def test_every_weight_changing_field_refuses_a_resume(section: str, values: dict[str, object]) -> None:
    """learningRate and weightDecay were once silently ignored on resume (the optimizer state kept the old
    values) while the checkpoint recorded the new ones."""
    old = c.parse_spec(BASE).to_spec()
    why, _ = c.resume_changes(old, c.parse_spec(spec_with(section, **values)))
    (name,) = values
    assert why is not None and why.startswith(f"{section}.{name}: changed from ")
    assert "new --checkpoint-dir" in why and "metadata.name" in why


def test_extending_and_observing_fields_are_applied_and_listed() -> None:
    old = c.parse_spec(spec_with("training", epochs=2)).to_spec()
    new = c.parse_spec(
        {
            **spec_with("training", epochs=5),
            "checkpoint": {"everySteps": 7, "keepLast": 3},
            "data": {"format": "synthetic", "numWorkers": 0},
        }
    )
    why, applied = c.resume_changes(old, new)
    assert why is None
    assert applied == [
        "data.numWorkers: 2 -> 0",
        "training.epochs: 2 -> 5",
        "checkpoint.everySteps: 100 -> 7",
        "checkpoint.keepLast: 2 -> 3",
    ]


def test_a_field_missing_from_an_old_checkpoint_counts_as_its_default() -> None:
    old = c.parse_spec(BASE).to_spec()
    del old["model"]["strictWeights"], old["data"]["maxBadFraction"]
    assert c.resume_changes(old, c.parse_spec(BASE)) == (None, [])
    why, _ = c.resume_changes(old, c.parse_spec(spec_with("model", strictWeights=False)))
    assert why is not None and why.startswith("model.strictWeights: changed from True to False")


def test_every_field_is_declared_once_with_a_resume_rule() -> None:
    from kubetune_trainer.fields import RESUME_KINDS

    for dotted, _, fs in c.all_field_specs():
        assert fs.doc and fs.doc[-1] == ".", f"{dotted}: a description ending in a period"
        assert fs.resume in RESUME_KINDS, dotted
    everything = set(c.RESUME_CRITICAL) | set(c.RESUME_EXTENDS) | set(c.RESUME_OBSERVES)
    assert len(everything) == sum(len(v) for v in c.TRAINER_FIELDS.values())
    assert {"training.learningRate", "training.weightDecay", "model.weights"} <= set(c.RESUME_CRITICAL)
    assert set(c.RESUME_EXTENDS) == {"training.epochs", "training.maxSteps"}


def test_numbers_in_exponent_form_are_numbers(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 1e-3 as a string; kubectl reads it as a number: the same manifest must run."""
    path = tmp_path / "job.yaml"
    path.write_text("model: {name: test_vit}\ndata: {format: synthetic}\ntraining: {learningRate: 1e-3}\n")
    assert c.load_job(path, env={}).training.learningRate == 0.001
    cfg = c.load_job(path, ["training.weightDecay=5E-2", "training.learningRate=2.5e-4"], env={})
    assert cfg.training.weightDecay == 0.05 and cfg.training.learningRate == 0.00025
    with pytest.raises(c.ConfigError, match=r"training.learningRate: must be a number, got '1e-3x'"):
        c.load_job(path, ["training.learningRate=1e-3x"], env={})


def test_config_module_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, kubetune_trainer.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


AUG = {"format": "imagefolder", "path": "/data/x"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"data": {**AUG, "augment": {"scale": [0.6]}}}, "data.augment.scale: must have 2 numbers, got 1"),
        ({"data": {**AUG, "augment": {"scale": [1.0, 0.6]}}}, r"data.augment.scale: must be \[min, max\]"),
        ({"data": {**AUG, "augment": {"scale": [0.6, "big"]}}}, r"data.augment.scale\[1\]: must be a number"),
        ({"data": {**AUG, "augment": {"scale": [0.0, 1.0]}}}, r"data.augment.scale\[0\]: must be > 0"),
        (
            {"data": {**AUG, "augment": {"scal": [0.6, 1.0]}}},
            "data.augment.scal: unknown field; did you mean scale",
        ),
        ({"data": {**AUG, "augment": 5}}, "data.augment: must be a mapping of scale, ratio"),
        ({"data": {**AUG, "augment": {"hflip": 2}}}, "data.augment.hflip: must be <= 1, got 2"),
        (
            {"data": {**AUG, "augment": {"remode": "pix"}}},
            "data.augment.remode: must be one of const, rand, pixel",
        ),
        ({"data": {"format": "synthetic", "augment": {}}}, "data.augment: needs data.format imagefolder"),
        # timm silently skips a section without a number (the dx): refused here instead
        (
            {"data": {**AUG, "augment": {"autoAugment": "augmix-m5-w4-dx"}}},
            "data.augment.autoAugment: 'augmix-m5-w4-dx' is not a timm policy string",
        ),
        (
            {"data": {**AUG, "augment": {"autoAugment": "randaug-m9"}}},
            "data.augment.autoAugment: 'randaug-m9' is not a timm policy string",
        ),
        ({"data": {**AUG, "sampling": "weighted"}}, "data.sampling: must be one of uniform, balanced"),
        ({"data": AUG, "training": {"mixup": {"mode": "bach"}}}, "training.mixup.mode: .*did you mean batch"),
        (
            {"data": AUG, "training": {"mixup": {"mixupAlpha": 0, "cutmixAlpha": 0}}},
            "training.mixup: mixupAlpha and cutmixAlpha are both 0",
        ),
        (
            {"data": AUG, "training": {"earlyStopping": {"patience": 0}}},
            "training.earlyStopping.patience: must be >= 1",
        ),
        (
            {"data": AUG, "training": {"earlyStopping": {"metric": "acc"}}},
            "training.earlyStopping.metric: must be one of",
        ),
        (
            {"data": AUG, "training": {"warmupSteps": 5, "warmupEpochs": 1}},
            "training.warmupEpochs: set either",
        ),
        ({"data": AUG, "training": {"betas": [0.9, 1.5]}}, r"training.betas\[1\]: must be < 1"),
        ({"data": AUG, "training": {"compile": "fast"}}, "training.compile: must be one of default"),
        ({"data": AUG, "checkpoint": {"best": {"metric": "top3"}}}, "checkpoint.best.metric: must be one of"),
        ({"data": AUG, "evaluation": {"everySteps": -1}}, "evaluation.everySteps: must be >= 0"),
        (
            {"data": AUG, "evaluation": {"every": 5}},
            "spec.evaluation.every: unknown field; did you mean everySteps",
        ),
    ],
)
def test_bad_nested_values_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(c.ConfigError, match=message):
        c.parse_spec({"model": {"name": "test_resnet"}, **spec})


def test_nested_objects_parse_with_defaults_and_round_trip() -> None:
    cfg = c.parse_spec(
        {
            "model": {"name": "test_resnet"},
            "data": {**AUG, "augment": {"scale": [0.6, 1], "autoAugment": "rand-m9-mstd0.5-inc1"}},
            "training": {"mixup": {"cutmixMinmax": [0.2, 0.8]}, "earlyStopping": {"metric": "loss"}},
            "checkpoint": {"best": {}},
        }
    )
    aug = cfg.data.augment
    assert aug is not None and aug.scale == (0.6, 1.0) and aug.hflip == 0.5 and aug.autoAugment
    assert cfg.training.mixup is not None and cfg.training.mixup.cutmixMinmax == (0.2, 0.8)
    assert cfg.checkpoint.best is not None and cfg.checkpoint.best.metric == "top1"
    spec = cfg.to_spec()
    assert spec["data"]["augment"]["scale"] == [0.6, 1.0] and spec["training"]["mixup"]["mode"] == "batch"
    again = c.parse_spec({"model": spec["model"], **{k: v for k, v in spec.items() if k != "model"}})
    assert again == cfg
    assert c.parse_spec({"model": {"name": "test_resnet"}, "data": AUG}).data.augment is None


def test_resume_names_the_changed_nested_field() -> None:
    base = {"model": {"name": "test_resnet"}, "data": {**AUG, "augment": {"hflip": 0.0}}}
    old = c.parse_spec(base).to_spec()
    why, _ = c.resume_changes(old, c.parse_spec({**base, "data": {**AUG, "augment": {"hflip": 0.5}}}))
    assert why is not None and why.startswith("data.augment.hflip: changed from 0.0 to 0.5")
    why, _ = c.resume_changes(old, c.parse_spec({**base, "data": AUG}))
    assert why is not None and why.startswith("data.augment: changed from {")
    # A checkpoint written before these fields existed resumes under a spec that leaves them unset.
    legacy = c.parse_spec({**base, "data": AUG}).to_spec()
    del legacy["data"]["augment"], legacy["data"]["sampling"], legacy["evaluation"]
    del legacy["training"]["mixup"], legacy["checkpoint"]["best"]
    assert c.resume_changes(legacy, c.parse_spec({**base, "data": AUG})) == (None, [])
