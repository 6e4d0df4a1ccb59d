"""The FineTuneJob spec as the trainer sees it: dataclasses, defaults, manifest loading, overrides, validation.

This module is the one place the spec's field names and defaults live. It imports neither torch nor timm
so the operator can import it cheaply (its CRD is checked against `TRAINER_FIELDS` by a test).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneJob"


class ConfigError(ValueError):
    """A spec the trainer cannot run. The message names the field path and what to fix (exit code 2)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""
    """timm model name, e.g. `resnet50.a1_in1k` or `test_resnet` (required)."""
    pretrained: bool = False
    """Load timm's pretrained weights from the local hub cache (HF_HOME); nothing is downloaded here."""
    weights: str | None = None
    """Local file (.safetensors or .pth) to initialise from; tensors whose shape differs (the head) are skipped."""
    numClasses: int | None = None
    """Classifier size; null means the number of classes found in the data."""
    freeze: str | tuple[str, ...] = "none"
    """`none`, `backbone` (everything but the classifier) or a list of parameter-name prefixes."""
    strictWeights: bool = True
    """Tensors of model.weights that cannot load (other than the replaced classifier) are an error."""


@dataclass(frozen=True)
class DataConfig:
    format: str = "imagefolder"
    """`imagefolder` (one folder per class, optional train/ and val/) or `synthetic` (random tensors)."""
    path: str | None = None
    """Dataset root; required for imagefolder. Overridden by $KUBETUNE_DATA_PATH."""
    imageSize: int | None = None
    """Square input size; null means the model's pretrained config input size."""
    valFraction: float = 0.1
    """Share held out for evaluation (seeded split) when there is no val/ folder."""
    numWorkers: int = 2
    """DataLoader worker processes per rank."""
    syntheticSamples: int = 256
    """Number of samples of the synthetic dataset."""
    maxBadFraction: float = 0.01
    """Share of a split's images that may fail to decode (each is replaced by a seeded other sample)."""


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int | None = None
    """Passes over the training set; at most one of epochs/maxSteps; neither means 1 epoch."""
    maxSteps: int | None = None
    """Optimizer steps to run instead of epochs."""
    batchSize: int = 32
    """Samples per micro-batch per process."""
    learningRate: float = 0.001
    """Peak learning rate (after warmup)."""
    weightDecay: float = 0.05
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    optimizer: str = "adamw"
    """`adamw` or `sgd` (momentum 0.9, nesterov)."""
    scheduler: str = "cosine"
    """`cosine` (to 0), `step` (x0.1 at 50% and 75%) or `constant`, applied after warmup."""
    warmupSteps: int = 0
    """Linear warmup steps from 0 to learningRate."""
    gradAccumulation: int = 1
    """Micro-batches per optimizer step."""
    precision: str = "auto"
    """`auto` (bf16 on CUDA, fp32 on CPU), `fp32`, `bf16` or `fp16`; mixed precision is used on CUDA only."""
    seed: int = 0
    """Seed for weights init, data order, split and every RNG."""
    deterministic: bool | None = None
    """Deterministic kernels (bitwise-reproducible resume); null means true on CPU, false on CUDA."""
    labelSmoothing: float = 0.0
    """Label smoothing for the cross-entropy loss."""
    gradClip: float = 0.0
    """Clip the global gradient norm to this value; 0 is off."""
    ema: bool = False
    """Keep an exponential moving average of the weights (timm ModelEmaV3); eval and export use it."""


@dataclass(frozen=True)
class CheckpointConfig:
    everySteps: int = 100
    """Save every N optimizer steps (0 = off); also saved at epoch end, on SIGTERM and at the end."""
    everySeconds: int = 0
    """Also save when this many seconds passed since the last save (0 = off)."""
    keepLast: int = 2
    """Checkpoints kept on disk (at least 2, so a torn newest one always has a fallback)."""


@dataclass(frozen=True)
class WandbConfig:
    project: str | None = None
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user)."""
    mode: str = "disabled"
    """`disabled`, `offline` or `online`. The API key comes only from $WANDB_API_KEY."""
    runName: str | None = None
    """Display name; defaults to the job name."""
    tags: tuple[str, ...] = ()
    """Run tags."""


@dataclass(frozen=True)
class MetricsConfig:
    port: int = 9400
    """Prometheus /metrics port (0 = off)."""


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
    out: dict[str, dict[str, Any]] = {}
    for section, cls in SECTIONS.items():
        out[section] = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            out[section][f.name] = list(default) if isinstance(default, tuple) else default
    out["model"]["name"] = None
    return out


# Changing one of these between a checkpoint and a resume makes the checkpoint meaningless (different
# parameters, data order or optimizer state), so the trainer refuses instead of silently diverging.
RESUME_CRITICAL: tuple[str, ...] = (
    "model.name",
    "model.numClasses",
    "model.freeze",
    "data.format",
    "data.imageSize",
    "data.valFraction",
    "data.syntheticSamples",
    "training.batchSize",
    "training.gradAccumulation",
    "training.optimizer",
    "training.seed",
    "training.ema",
)


def _unknown(path: str, key: str, known: Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if not close:
        close = [k for k in known if k.lower() == key.lower()]
    hint = f"; did you mean {close[0]}?" if close else f"; known fields: {', '.join(sorted(known))}"
    return ConfigError(f"{path}.{key}: unknown field{hint}")


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


def _positive(path: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{path}: must be {bound}, got {value}")


def _choice(path: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"{path}: must be one of {', '.join(choices)}, got {value!r}{hint}")


def validate(cfg: JobConfig) -> None:
    """All value checks of the spec; the first failure raises ConfigError('<field path>: <what to fix>')."""
    m, d, t, c, w = cfg.model, cfg.data, cfg.training, cfg.checkpoint, cfg.wandb
    if not m.name:
        raise ConfigError("model.name: required (a timm model name, e.g. resnet50)")
    _positive("model.numClasses", m.numClasses)
    if isinstance(m.freeze, str) and m.freeze not in ("none", "backbone"):
        raise ConfigError(
            f"model.freeze: must be none, backbone or a list of module prefixes, got {m.freeze!r}"
        )
    _choice("data.format", d.format, ("imagefolder", "synthetic"))
    if d.format == "imagefolder" and not d.path:
        raise ConfigError("data.path: required for data.format imagefolder (or set $KUBETUNE_DATA_PATH)")
    _positive("data.imageSize", d.imageSize)
    if not 0.0 <= d.valFraction < 1.0:
        raise ConfigError(f"data.valFraction: must be >= 0 and < 1, got {d.valFraction}")
    _positive("data.numWorkers", d.numWorkers, allow_zero=True)
    _positive("data.syntheticSamples", d.syntheticSamples)
    if t.epochs is not None and t.maxSteps is not None:
        raise ConfigError("training.maxSteps: set either training.epochs or training.maxSteps, not both")
    _positive("training.epochs", t.epochs)
    _positive("training.maxSteps", t.maxSteps)
    _positive("training.batchSize", t.batchSize)
    _positive("training.learningRate", t.learningRate)
    _positive("training.weightDecay", t.weightDecay, allow_zero=True)
    _choice("training.optimizer", t.optimizer, ("adamw", "sgd"))
    _choice("training.scheduler", t.scheduler, ("cosine", "step", "constant"))
    _positive("training.warmupSteps", t.warmupSteps, allow_zero=True)
    _positive("training.gradAccumulation", t.gradAccumulation)
    _choice("training.precision", t.precision, ("auto", "fp32", "bf16", "fp16"))
    _positive("training.seed", t.seed, allow_zero=True)
    if not 0.0 <= t.labelSmoothing < 1.0:
        raise ConfigError(f"training.labelSmoothing: must be >= 0 and < 1, got {t.labelSmoothing}")
    _positive("training.gradClip", t.gradClip, allow_zero=True)
    _positive("checkpoint.everySteps", c.everySteps, allow_zero=True)
    _positive("checkpoint.everySeconds", c.everySeconds, allow_zero=True)
    if c.keepLast < 2:
        raise ConfigError(
            f"checkpoint.keepLast: must be >= 2 (a fallback for a torn newest one), got {c.keepLast}"
        )
    _choice("wandb.mode", w.mode, ("disabled", "offline", "online"))
    if not 0 <= cfg.metrics.port <= 65535:
        raise ConfigError(f"metrics.port: must be 0 (off) or a port 1-65535, got {cfg.metrics.port}")


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


def resume_mismatch(old_spec: Mapping[str, Any], new: JobConfig) -> str | None:
    """First resume-critical field that differs between a checkpoint's spec and the current one, as a message."""
    new_spec = new.to_spec()
    for dotted in RESUME_CRITICAL:
        section, key = dotted.split(".")
        before = (old_spec.get(section) or {}).get(key)
        after = new_spec[section][key]
        if before != after:
            return (
                f"{dotted}: changed from {before!r} to {after!r} since the checkpoint; "
                "restore it or use a new checkpoint directory"
            )
    return None
