"""The FineTuneJob spec as the trainer sees it: one declaration per field, validation, resume rules.

Each trainer field is declared once here (`spec_field`: default, description, resume rule, bounds); the
checks below, the CRD's trainer sections (hack/crd/gen_crd.py), docs/trainer.md's field table and which
fields a resume may change all come from that declaration. Reading manifests is manifest.py's. It imports
neither torch nor timm, so the operator imports it too (for the operator-only field names).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
        "Local .safetensors/.pth file to initialise from, loaded through timm's pretrained path (the "
        "model's checkpoint filter runs, e.g. ViT pos_embed resampled to data.imageSize); the file's "
        "classifier is kept when its shape fits and replaced when it does not (another class count); "
        "overrides model.pretrained.",
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
        'Which parameters are not trained: "none", "backbone" (only the classifier timm reports trains: '
        'what pretrained_cfg["classifier"] names plus get_classifier(), e.g. head.fc but not head.norm, '
        "both heads of distilled models; BatchNorm in frozen modules keeps its statistics), or a list of "
        'parameter-name prefixes to freeze, e.g. ["stem", "stages.0"].',
        RUN,
    )
    strictWeights: bool = spec_field(
        True,
        "With model.weights: a model tensor the file lacks or has in another shape, or a file tensor the "
        "model does not use (the classifier excepted), fails the job (exit 2, naming them); false logs a "
        "warning and trains those tensors from their initialisation.",
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
class TensorBoardConfig:
    enabled: bool = spec_field(
        True,
        "Write TensorBoard event files (scalars, eval histograms and misclassified images, the spec, "
        "hparams) to the checkpoint volume's tensorboard/ folder: one record per job, however many pods "
        "it took (a resumed attempt drops what the last one logged after its checkpoint). On unless set "
        "to false: the files are small and cost no training time.",
        OBSERVE,
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
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)

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
    "tensorboard": TensorBoardConfig,
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
    "tensorboard": frozenset({"serve"}),
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


# Reading manifests lives in manifest.py; these names stay importable from here (cli, tests, benches).
from kubetune_trainer.manifest import load_job, parse_spec, set_path  # noqa: E402

__all__ = ["ConfigError", "JobConfig", "load_job", "parse_spec", "resume_changes", "set_path", "validate"]
