"""The FineTuneJob spec as the trainer sees it: dataclasses, defaults, manifest loading, overrides, validation.

This module is the one place the spec's field names and defaults live. It imports neither torch nor timm
so the operator can import it cheaply (its CRD is checked against `TRAINER_FIELDS` by a test).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune_trainer.fields import EXTEND, OBSERVE, RUN, FieldSpec, default_of, field_spec, spec_field

API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneJob"
INT32_MAX = 2**31 - 1
BIG = 10**9


class ConfigError(ValueError):
    """A spec the trainer cannot run. The message names the field path and what to fix (exit code 2)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = spec_field(
        "",
        "timm model name as passed to timm.create_model, e.g. resnet50.a1_in1k, vit_small_patch16_224 or "
        "test_resnet; an unknown name exits 2 with the closest matches.",
        RUN,
        required=True,
        maxLength=256,
        pattern=r"^[A-Za-z0-9_.:/-]+$",
    )
    pretrained: bool = spec_field(
        False,
        "Load timm's pretrained weights from the hub cache in the image (HF_HOME); nothing is downloaded.",
        RUN,
    )
    weights: str | None = spec_field(
        None,
        "Local .safetensors/.pth file to initialise from, loaded through timm's pretrained path (its "
        "checkpoint filter resamples ViT pos_embed and adapts the input conv); the classifier is replaced "
        "when the class count differs.",
        RUN,
        maxLength=4096,
    )
    numClasses: int | None = spec_field(
        None,
        "Number of output classes (classifier size). Unset: the number of classes found in the data.",
        RUN,
        gt=0,
        le=100000,
        format="int32",
    )
    freeze: str | tuple[str, ...] = spec_field(
        "none",
        'Which parameters are not trained: "none", "backbone" (everything but the classifier timm reports; '
        'BatchNorm statistics frozen too), or a list of parameter-name prefixes, e.g. ["stem", "stages.0"].',
        RUN,
    )
    strictWeights: bool = spec_field(
        True,
        "Fail (exit 2, naming them) when tensors of model.weights cannot load, other than the replaced "
        "classifier; false logs them and trains them from their initialisation.",
        RUN,
    )


@dataclass(frozen=True)
class DataConfig:
    format: str = spec_field(
        "imagefolder",
        "imagefolder: one sub-directory per class under `path` (optionally inside train/ and val/); "
        "synthetic: random tensors (smoke tests).",
        RUN,
        choices=("imagefolder", "synthetic"),
    )
    path: str | None = spec_field(
        None,
        "Dataset directory; required for imagefolder. In a pod it is inside the data volume (mounted at "
        "/data; /data when claimName is set), and $KUBETUNE_DATA_PATH overrides it. It may move between "
        "resumes: the class names and sample count are checked instead.",
        OBSERVE,
        maxLength=4096,
    )
    imageSize: int | None = spec_field(
        None,
        "Square input resolution in pixels. Unset: the model's default input size. The exported model's "
        "config states the size trained at.",
        RUN,
        ge=8,
        le=1024,
        format="int32",
    )
    valFraction: float = spec_field(
        0.1,
        "Share of the samples held out for validation (seeded) when there is no val/ folder.",
        RUN,
        ge=0,
        le=0.9,
    )
    numWorkers: int = spec_field(
        2,
        "DataLoader worker processes per training process; the samples do not depend on it.",
        OBSERVE,
        ge=0,
        le=64,
        format="int32",
    )
    syntheticSamples: int = spec_field(
        256, "Number of samples when format is synthetic.", RUN, gt=0, le=10**7, format="int32"
    )
    maxBadFraction: float = spec_field(
        0.01,
        "Share of a split's images that may fail to decode; each is replaced by a fixed, seeded other "
        "sample (logged with its path). Above it the job fails (exit 2) listing the files.",
        OBSERVE,
        ge=0,
        le=1,
    )


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int | None = spec_field(
        None,
        "Passes over the training set. Mutually exclusive with maxSteps; neither means 1 epoch. A resume "
        "may extend it (the schedule then stretches to the new total).",
        EXTEND,
        gt=0,
        le=100000,
        format="int32",
    )
    maxSteps: int | None = spec_field(
        None,
        "Total optimizer steps. Mutually exclusive with epochs. A resume may extend it.",
        EXTEND,
        gt=0,
        le=BIG,
    )
    batchSize: int = spec_field(
        32, "Samples per micro-batch per training process.", RUN, gt=0, le=65536, format="int32"
    )
    learningRate: float = spec_field(0.001, "Peak learning rate (after warmup).", RUN, gt=0, le=10)
    weightDecay: float = spec_field(
        0.05, "Decoupled weight decay (adamw) or L2 penalty (sgd).", RUN, ge=0, le=1
    )
    optimizer: str = spec_field(
        "adamw", "adamw, or sgd (momentum 0.9, nesterov).", RUN, choices=("adamw", "sgd")
    )
    scheduler: str = spec_field(
        "cosine",
        "Learning-rate schedule after warmup: cosine (to 0), step (x0.1 at 50% and 75%) or constant.",
        RUN,
        choices=("cosine", "step", "constant"),
    )
    warmupSteps: int = spec_field(0, "Linear warmup steps from 0 to learningRate.", RUN, ge=0, le=BIG)
    gradAccumulation: int = spec_field(
        1, "Micro-batches accumulated per optimizer step.", RUN, gt=0, le=1024, format="int32"
    )
    precision: str = spec_field(
        "auto",
        "Numeric precision: auto is bf16 on CUDA and fp32 on CPU; fp16 uses a GradScaler; mixed precision "
        "is used on CUDA only.",
        RUN,
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    seed: int = spec_field(
        0,
        "Seed for weight init, the split, data order and every random number generator.",
        RUN,
        ge=0,
        le=INT32_MAX,
    )
    deterministic: bool | None = spec_field(
        None,
        "Deterministic kernels (bitwise-reproducible resume, slower). Unset: true on CPU, false on CUDA.",
        RUN,
    )
    labelSmoothing: float = spec_field(0.0, "Label smoothing for the cross-entropy loss.", RUN, ge=0, lt=1)
    gradClip: float = spec_field(
        0.0, "Clip the global gradient norm to this value; 0 disables clipping.", RUN, ge=0, le=10**6
    )
    ema: bool = spec_field(
        False,
        "Keep an exponential moving average of the weights (timm ModelEmaV3); evaluation and export use it.",
        RUN,
    )


@dataclass(frozen=True)
class CheckpointConfig:
    everySteps: int = spec_field(
        100,
        "Save a checkpoint every this many optimizer steps; 0 disables (epoch-end, SIGTERM and final "
        "saves still happen).",
        OBSERVE,
        ge=0,
        le=BIG,
    )
    everySeconds: int = spec_field(
        0, "Also save when this many seconds passed since the last save; 0 disables.", OBSERVE, ge=0, le=86400
    )
    keepLast: int = spec_field(
        2,
        "Number of newest valid checkpoints kept; older ones are deleted.",
        OBSERVE,
        ge=2,
        le=100,
        why="a fallback for a torn newest one",
        format="int32",
    )


@dataclass(frozen=True)
class WandbConfig:
    project: str | None = spec_field(None, "W&B project.", OBSERVE, maxLength=128)
    entity: str | None = spec_field(None, "W&B entity (user or team).", OBSERVE, maxLength=128)
    mode: str = spec_field(
        "disabled",
        "disabled: no W&B; offline: write run files to the checkpoint volume; online: sync to the W&B "
        "server. The API key comes only from $WANDB_API_KEY.",
        OBSERVE,
        choices=("disabled", "offline", "online"),
    )
    runName: str | None = spec_field(
        None, "Display name of the run. Unset: the FineTuneJob name.", OBSERVE, maxLength=128
    )
    tags: tuple[str, ...] = spec_field((), "Tags added to the run.", OBSERVE, maxItems=32, itemMaxLength=64)


@dataclass(frozen=True)
class MetricsConfig:
    port: int = spec_field(
        9400,
        "Port of the trainer's Prometheus /metrics endpoint; 0 turns it off.",
        OBSERVE,
        ge=0,
        le=65535,
        format="int32",
    )


@dataclass(frozen=True)
class JobConfig:
    name: str
    """metadata.name of the FineTuneJob (`local` for a bare spec)."""
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_spec(self) -> dict[str, Any]:
        """The spec as plain data (camelCase), as stored in checkpoints and logged to W&B."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name != "name":
                out[f.name] = {
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in _asdict(getattr(self, f.name)).items()
                }
        return out

    @property
    def total_epochs_or_steps(self) -> tuple[int | None, int | None]:
        t = self.training
        if t.epochs is None and t.maxSteps is None:
            return 1, None
        return t.epochs, t.maxSteps

    def validate(self) -> JobConfig:
        """Raise ConfigError naming the first bad field; return self so calls chain."""
        validate(self)
        return self


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "wandb": WandbConfig,
    "metrics": MetricsConfig,
}

# Fields only the operator reads; the trainer accepts and ignores them so one manifest serves both.
OPERATOR_ONLY_TOP = frozenset(
    {
        "image",
        "imagePullPolicy",
        "workers",
        "resources",
        "nodeSelector",
        "tolerations",
        "affinity",
        "priorityClassName",
        "serviceAccountName",
        "terminationGracePeriodSeconds",
        "podTemplate",
        "runPolicy",
    }
)
OPERATOR_ONLY_FIELDS: dict[str, frozenset[str]] = {
    "data": frozenset({"claimName"}),
    "checkpoint": frozenset({"storage", "existingClaim", "retainOnDelete"}),
    "wandb": frozenset({"apiKeySecretRef"}),
}

TRAINER_FIELDS: dict[str, tuple[str, ...]] = {
    section: tuple(f.name for f in dataclasses.fields(cls)) for section, cls in SECTIONS.items()
}
"""Trainer field names per spec section, e.g. TRAINER_FIELDS["training"] contains "batchSize"."""


def trainer_fields() -> dict[str, tuple[str, ...]]:
    """Same as TRAINER_FIELDS (a copy), for callers that prefer a function."""
    return dict(TRAINER_FIELDS)


def field_defaults() -> dict[str, dict[str, Any]]:
    """Default value of every trainer field per section (None where there is no default, e.g. model.name)."""
    return {
        section: {f.name: default_of(f) for f in dataclasses.fields(cls)} for section, cls in SECTIONS.items()
    }


def field_specs() -> dict[str, dict[str, tuple[dataclasses.Field[Any], FieldSpec]]]:
    """Every trainer field's declaration per section: {"training": {"batchSize": (field, FieldSpec)}}."""
    return {
        section: {f.name: (f, field_spec(f)) for f in dataclasses.fields(cls)}
        for section, cls in SECTIONS.items()
    }


def fields_by_resume(kind: str) -> tuple[str, ...]:
    """Dotted paths of the fields whose resume rule is `kind` (RUN, EXTEND or OBSERVE), in spec order."""
    return tuple(
        f"{section}.{name}"
        for section, specs in field_specs().items()
        for name, (_, fs) in specs.items()
        if fs.resume == kind
    )


RESUME_CRITICAL: tuple[str, ...] = fields_by_resume(RUN)
"""Fields that define the run: changing one between a checkpoint and its resume makes the checkpoint
describe another run (other weights, data order or optimizer), so the trainer refuses (exit 2)."""
RESUME_EXTENDS: tuple[str, ...] = fields_by_resume(EXTEND)
RESUME_OBSERVES: tuple[str, ...] = fields_by_resume(OBSERVE)


def _unknown(path: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:
        close = [k for k in known if k.lower() == key.lower()]
    hint = f"; did you mean {close[0]}?" if close else f"; known fields: {', '.join(sorted(known))}"
    return ConfigError(f"{path}.{key}: unknown field{hint}")


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(path: str, f: dataclasses.Field[Any], value: Any) -> Any:
    """Check a raw YAML value against the field's annotation (strings, from the class body)."""
    ann = str(f.type)
    if value is None:
        if "None" in ann:
            return None
        raise ConfigError(f"{path}: must not be null")
    if ann.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {value!r}")
        return value
    if ann.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        return value
    if ann.startswith("float"):
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            value = float(value)  # 1e-3: a string to YAML 1.1 (PyYAML), a number to kubectl and JSON
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        return float(value)
    if ann.startswith("tuple"):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{path}: must be a list of strings, got {value!r}")
        return tuple(value)
    if ann.startswith("str | tuple"):
        if isinstance(value, str):
            return value
        if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{path}: must be a string or a non-empty list of strings, got {value!r}")
    if ann.startswith("str"):
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    return value


def parse_spec(spec: Mapping[str, Any], name: str = "local") -> JobConfig:
    """Turn a raw `spec` mapping into a validated JobConfig (ConfigError on anything wrong)."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"spec: must be a mapping, got {type(spec).__name__}")
    for key in spec:
        if key not in SECTIONS and key not in OPERATOR_ONLY_TOP:
            raise _unknown("spec", key, [*SECTIONS, *OPERATOR_ONLY_TOP])
    if "model" not in spec:
        raise ConfigError("spec.model.name: required (a timm model name, e.g. resnet50)")
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        raw = spec.get(section) or {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"spec.{section}: must be a mapping, got {raw!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        ignored = OPERATOR_ONLY_FIELDS.get(section, frozenset())
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in ignored:
                continue
            if key not in fields:
                raise _unknown(f"spec.{section}", key, [*fields, *ignored])
            kwargs[key] = _coerce(f"{section}.{key}", fields[key], value)
        sections[section] = cls(**kwargs)
    return JobConfig(name=name, **sections).validate()


def validate(cfg: JobConfig) -> None:
    """All value checks of the spec; the first failure raises ConfigError('<field path>: <what to fix>').

    Required fields, bounds and choices come from each field's declaration; the rest are cross-field rules.
    """
    for section, specs in field_specs().items():
        values = getattr(cfg, section)
        for name, (_, fs) in specs.items():
            path, value = f"{section}.{name}", getattr(values, name)
            if fs.required and not value:
                raise ConfigError(f"{path}: required ({fs.doc.split(';')[0].split(', e.g.')[0]})")
            problem = fs.check(path, value)
            if problem:
                close = difflib.get_close_matches(str(value), fs.choices, n=1) if fs.choices else []
                raise ConfigError(problem + (f"; did you mean {close[0]}?" if close else ""))
    m, d, t = cfg.model, cfg.data, cfg.training
    if isinstance(m.freeze, str) and m.freeze not in ("none", "backbone"):
        raise ConfigError(
            f"model.freeze: must be none, backbone or a list of module prefixes, got {m.freeze!r}"
        )
    if d.format == "imagefolder" and not d.path:
        raise ConfigError("data.path: required for data.format imagefolder (or set $KUBETUNE_DATA_PATH)")
    if t.epochs is not None and t.maxSteps is not None:
        raise ConfigError("training.maxSteps: set either training.epochs or training.maxSteps, not both")


def set_path(doc: dict[str, Any], assignment: str) -> None:
    """Apply one `--set training.epochs=3` to a raw spec dict (value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected FIELD=VALUE, e.g. training.epochs=3")
    key, _, raw = assignment.partition("=")
    parts = key.strip().removeprefix("spec.").split(".")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw else None


def load_job(
    path: str | Path | None, overrides: Iterable[str] = (), env: Mapping[str, str] | None = None
) -> JobConfig:
    """Read a FineTuneJob manifest or a bare spec, apply --set overrides and $KUBETUNE_DATA_PATH, validate."""
    env = os.environ if env is None else env
    doc: Any = {}
    if path is not None:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"-f {path}: cannot read: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"-f {path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"-f {path}: expected a FineTuneJob manifest or a spec mapping")
    name = "local"
    if "spec" in doc or "kind" in doc:
        if doc.get("kind", KIND) != KIND:
            raise ConfigError(f"kind: expected {KIND}, got {doc.get('kind')!r}")
        name = str((doc.get("metadata") or {}).get("name") or name)
        spec = doc.get("spec") or {}
    else:
        spec = doc
    spec = _deepcopy(spec)
    for assignment in overrides:
        set_path(spec, assignment)
    if env.get("KUBETUNE_DATA_PATH"):
        spec.setdefault("data", {})
        if isinstance(spec["data"], dict):
            spec["data"]["path"] = env["KUBETUNE_DATA_PATH"]
    return parse_spec(spec, name=env.get("KUBETUNE_JOB") or name)


def _deepcopy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _deepcopy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deepcopy(v) for v in obj]
    return obj


def resume_changes(old_spec: Mapping[str, Any], new: JobConfig) -> tuple[str | None, list[str]]:
    """Compare a checkpoint's spec with the current one: (refusal message or None, applied changes).

    A run-defining field that differs gives the message (field, old and new values, the fix); extending
    or observing fields are returned as `field: old -> new` lines to log. A field the checkpoint's spec
    lacks (written before the field existed) counts as its default.
    """
    defaults, new_spec = field_defaults(), new.to_spec()
    applied: list[str] = []
    for section, specs in field_specs().items():
        for name, (_, fs) in specs.items():
            before = (old_spec.get(section) or {}).get(name, defaults[section][name])
            after = new_spec[section][name]
            if before == after:
                continue
            dotted = f"{section}.{name}"
            if fs.resume == RUN:
                return (
                    f"{dotted}: changed from {before!r} to {after!r} since the checkpoint, but it defines "
                    f"the run (a resume would silently keep training the old one); restore {dotted}: "
                    f"{before!r}, or start a new run with a new --checkpoint-dir (on Kubernetes: a new "
                    "metadata.name)",
                    applied,
                )
            applied.append(f"{dotted}: {before!r} -> {after!r}")
    return None, applied


def resume_mismatch(old_spec: Mapping[str, Any], new: JobConfig) -> str | None:
    """First run-defining field that differs between a checkpoint's spec and the current one, as a message."""
    return resume_changes(old_spec, new)[0]
