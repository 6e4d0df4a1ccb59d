"""The FineTuneJob spec as the trainer sees it: one declaration per field, validation, resume rules.

Each trainer field is declared once here (`spec_field`: default, description, resume rule, bounds); the
checks below, the CRD's trainer sections (hack/crd/gen_crd.py), docs/trainer.md's field table and which
fields a resume may change all come from that declaration. Reading manifests is manifest.py's. It imports
neither torch nor timm, so the operator imports it too (for the operator-only field names).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.fields import (
    EXTEND,
    OBSERVE,
    RUN,
    FieldSpec,
    default_of,
    field_spec,
    plain,
    spec_field,
    walk,
)

API_VERSION = "kubetune.io/v1alpha1"
KIND = "FineTuneJob"
INT32_MAX = 2**31 - 1
BIG = 10**9


AUTO_AUGMENT_PATTERN = r"^(rand|augmix|original|originalr|v0|v0r|3a)(-[a-z]+[0-9][0-9.]*)*$"
"""timm's policy strings: a name, then `-<key><number>` sections (timm skips a section without a number
silently, e.g. the `dx` of augmix-m5-w4-dx, so the trainer and the CRD refuse it)."""


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
class AugmentConfig:
    """data.augment: timm's training transform (create_transform(is_training=True)), in camelCase."""

    scale: tuple[float, ...] = spec_field(
        (0.08, 1.0),
        "[min, max] share of the image area the random resized crop keeps.",
        RUN,
        gt=0,
        le=1,
        items=2,
    )
    ratio: tuple[float, ...] = spec_field(
        (0.75, 1.3333333333333333),
        "[min, max] aspect ratio of the random resized crop.",
        RUN,
        gt=0,
        le=10,
        items=2,
    )
    hflip: float = spec_field(
        0.5,
        "Probability of a horizontal flip; set 0 where left and right differ (digits, text, signs).",
        RUN,
        ge=0,
        le=1,
    )
    vflip: float = spec_field(0.0, "Probability of a vertical flip.", RUN, ge=0, le=1)
    colorJitter: float = spec_field(
        0.4,
        "Brightness, contrast and saturation jitter strength (timm applies it only without autoAugment).",
        RUN,
        ge=0,
        le=1,
    )
    autoAugment: str | None = spec_field(
        None,
        "timm's auto-augment policy string, e.g. rand-m9-mstd0.5-inc1 (RandAugment), augmix-m5-w4-d2, "
        "original or v0 (AutoAugment). Unset: none.",
        RUN,
        maxLength=128,
        pattern=AUTO_AUGMENT_PATTERN,
    )
    reprob: float = spec_field(0.0, "Random erasing probability (after normalisation).", RUN, ge=0, le=1)
    remode: str = spec_field(
        "pixel",
        "Random erasing fill: const (zeros), rand (one random colour per erased box), pixel (noise).",
        RUN,
        choices=("const", "rand", "pixel"),
    )
    recount: int = spec_field(1, "Random erasing boxes per image.", RUN, ge=1, le=16, format="int32")
    interpolation: str | None = spec_field(
        None,
        "Resize interpolation of the random crop; random picks bilinear or bicubic per sample. Unset: "
        "the model's own (as evaluation uses).",
        RUN,
        choices=("bilinear", "bicubic", "nearest", "random"),
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
    augment: AugmentConfig | None = spec_field(  # noqa: RUF009 (the default is None)
        None,
        "Random training augmentation with timm's create_transform(is_training=True) names. Exact: each "
        "sample's random transform is seeded from (training.seed, epoch, sample index), so a resumed run, "
        "any numWorkers and another machine give the same tensors. Unset: none (the eval transform). "
        "Needs data.format imagefolder.",
        RUN,
        nested=AugmentConfig,
    )
    sampling: str = spec_field(
        "uniform",
        "uniform: every sample once per epoch; balanced: samples drawn with weights 1/(its class's count), "
        "seeded and resumable per rank, so every class is seen about equally often.",
        RUN,
        choices=("uniform", "balanced"),
    )


@dataclass(frozen=True)
class MixupConfig:
    """training.mixup: timm's Mixup (and SoftTargetCrossEntropy), seeded from (seed, step, rank)."""

    mixupAlpha: float = spec_field(0.8, "Mixup beta-distribution alpha; 0 disables mixup.", RUN, ge=0, le=100)
    cutmixAlpha: float = spec_field(1.0, "CutMix alpha; 0 disables cutmix.", RUN, ge=0, le=100)
    cutmixMinmax: tuple[float, ...] | None = spec_field(
        None,
        "[min, max] share of the image a CutMix box takes (overrides cutmixAlpha). Unset: from the alpha.",
        RUN,
        gt=0,
        lt=1,
        items=2,
    )
    prob: float = spec_field(1.0, "Probability of applying mixup or cutmix to a batch.", RUN, ge=0, le=1)
    switchProb: float = spec_field(
        0.5, "Probability of cutmix instead of mixup when both are on.", RUN, ge=0, le=1
    )
    mode: str = spec_field(
        "batch",
        "batch: one draw per batch; pair: per pair of samples; elem: per sample.",
        RUN,
        choices=("batch", "pair", "elem"),
    )
    offEpoch: int = spec_field(
        0, "Turn mixup/cutmix off from this epoch on; 0: never.", RUN, ge=0, le=100000, format="int32"
    )


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """training.earlyStopping: end the run when the evaluated metric stops improving."""

    metric: str = spec_field(
        "top1",
        "Evaluation metric watched: top1 and top5 are maximised, loss minimised.",
        RUN,
        choices=("top1", "top5", "loss"),
    )
    patience: int = spec_field(
        5,
        "Evaluations without an improvement of more than minDelta before the job ends (Succeeded, "
        "reason EarlyStopped).",
        RUN,
        ge=1,
        le=10000,
        format="int32",
    )
    minDelta: float = spec_field(
        0.0, "Smallest change of the metric that counts as an improvement.", RUN, ge=0, le=1000
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
        "adamw",
        "Any optimizer name timm.optim.create_optimizer_v2 knows: adamw, sgd (nesterov, with momentum), "
        "momentum, lamb, lion, adan, adabelief, ... An unknown name exits 2 listing the close ones. "
        "Weight decay skips norm and bias parameters, as timm does.",
        RUN,
        maxLength=64,
        pattern=r"^[a-z0-9_]+$",
    )
    momentum: float = spec_field(
        0.9, "Momentum of sgd, momentum and the other SGD-like optimizers.", RUN, ge=0, lt=1
    )
    betas: tuple[float, ...] | None = spec_field(
        None,
        "[beta1, beta2] of Adam-like optimizers. Unset: the optimizer's default.",
        RUN,
        ge=0,
        lt=1,
        items=2,
    )
    eps: float | None = spec_field(
        None, "Optimizer epsilon. Unset: the optimizer's default.", RUN, gt=0, le=1
    )
    layerDecay: float | None = spec_field(
        None,
        "Layer-wise learning-rate decay (timm's param groups): each layer below the head trains at this "
        "factor of the one above, e.g. 0.75 for ViT fine-tuning. Unset: one learning rate.",
        RUN,
        gt=0,
        le=1,
    )
    scheduler: str = spec_field(
        "cosine",
        "timm scheduler (create_scheduler_v2), stepped per optimizer update: cosine (to "
        "minLearningRate), step (x0.1 at 50% and 75% of training), multistep (the same), poly, tanh, "
        "plateau (x0.1 after 10 evaluations without improvement of eval loss) or constant.",
        RUN,
        choices=("cosine", "step", "multistep", "poly", "tanh", "plateau", "constant"),
    )
    minLearningRate: float = spec_field(
        0.0,
        "Learning rate the cosine, poly and tanh schedules end at, and plateau's floor.",
        RUN,
        ge=0,
        le=10,
    )
    warmupLearningRate: float = spec_field(
        0.0, "Learning rate the linear warmup starts from.", RUN, ge=0, le=10
    )
    warmupSteps: int = spec_field(
        0, "Linear warmup steps from warmupLearningRate to learningRate.", RUN, ge=0, le=BIG
    )
    warmupEpochs: float = spec_field(
        0.0,
        "Warmup length in epochs (converted to steps); mutually exclusive with warmupSteps.",
        RUN,
        ge=0,
        le=100000,
    )
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
    emaDecay: float = spec_field(
        0.9998, "Decay of the weights' moving average (training.ema).", RUN, gt=0, lt=1
    )
    channelsLast: bool = spec_field(
        False, "Train in channels_last memory format (faster convolutions on recent GPUs).", RUN
    )
    compile: str | None = spec_field(
        None,
        "torch.compile the model with this mode; checkpoints and the export stay loadable without "
        "compile. Unset: eager.",
        RUN,
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    )
    mixup: MixupConfig | None = spec_field(  # noqa: RUF009 (the default is None)
        None,
        "Mixup/CutMix with timm's Mixup and SoftTargetCrossEntropy (labelSmoothing folded into the soft "
        "targets); its randomness is seeded from (seed, step, rank), so resume stays exact. Unset: off.",
        RUN,
        nested=MixupConfig,
    )
    earlyStopping: EarlyStoppingConfig | None = spec_field(  # noqa: RUF009 (the default is None)
        None,
        "End the job (Succeeded, reason EarlyStopped) when the evaluated metric stopped improving. Unset: "
        "train to the end.",
        RUN,
        nested=EarlyStoppingConfig,
    )


@dataclass(frozen=True)
class BestConfig:
    """checkpoint.best: which evaluated model to keep in best/."""

    metric: str = spec_field(
        "top1", "Evaluation metric that ranks the models.", RUN, choices=("top1", "top5", "loss")
    )
    mode: str | None = spec_field(
        None, "max or min. Unset: min for loss, max otherwise.", RUN, choices=("max", "min")
    )


@dataclass(frozen=True)
class EvaluationConfig:
    everySteps: int = spec_field(
        0,
        "Also evaluate every this many optimizer steps (besides each epoch's end and the final step); "
        "0: at epoch ends only. Each report is eval/step-N.json on the checkpoint volume.",
        RUN,
        ge=0,
        le=BIG,
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
    best: BestConfig | None = spec_field(  # noqa: RUF009 (the default is None)
        None,
        "Keep the best evaluated model in best/ beside final/, exported the same loadable way and never "
        "deleted by keepLast; the status shows its metric and step. Unset: final/ only.",
        RUN,
        nested=BestConfig,
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
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_spec(self) -> dict[str, Any]:
        """The spec as plain data (camelCase), as stored in checkpoints and logged to W&B."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "name"}

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


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "wandb": WandbConfig,
    "metrics": MetricsConfig,
    "tensorboard": TensorBoardConfig,
    "evaluation": EvaluationConfig,
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
        "automountServiceAccountToken",
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


def all_field_specs() -> list[tuple[str, dataclasses.Field[Any], FieldSpec]]:
    """(dotted path, field, spec) of every trainer field, nested ones included (data.augment.scale)."""
    return [row for section, cls in SECTIONS.items() for row in walk(cls, section)]


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
    for section, cls in SECTIONS.items():
        _check_fields(cls, section, getattr(cfg, section))
    m, d, t = cfg.model, cfg.data, cfg.training
    if isinstance(m.freeze, str) and m.freeze not in ("none", "backbone"):
        raise ConfigError(
            f"model.freeze: must be none, backbone or a list of module prefixes, got {m.freeze!r}"
        )
    if d.format == "imagefolder" and not d.path:
        raise ConfigError("data.path: required for data.format imagefolder (or set $KUBETUNE_DATA_PATH)")
    if t.epochs is not None and t.maxSteps is not None:
        raise ConfigError("training.maxSteps: set either training.epochs or training.maxSteps, not both")
    if t.warmupSteps and t.warmupEpochs:
        raise ConfigError("training.warmupEpochs: set either warmupSteps or warmupEpochs, not both")
    if (
        d.augment is not None
        and d.augment.autoAugment
        and not re.match(AUTO_AUGMENT_PATTERN, d.augment.autoAugment)
    ):
        raise ConfigError(
            f"data.augment.autoAugment: {d.augment.autoAugment!r} is not a timm policy string: a name (rand, "
            "augmix, original, v0, ...) then -<key><number> sections, e.g. rand-m9-mstd0.5-inc1 or "
            "augmix-m5-w4-d2"
        )
    if d.augment is not None and d.format != "imagefolder":
        raise ConfigError(
            "data.augment: needs data.format imagefolder (synthetic samples are tensors, not images); "
            "remove data.augment or use an image folder"
        )
    for path, pair in (
        ("data.augment.scale", d.augment and d.augment.scale),
        ("data.augment.ratio", d.augment and d.augment.ratio),
        ("training.mixup.cutmixMinmax", t.mixup and t.mixup.cutmixMinmax),
    ):
        if pair and pair[0] > pair[1]:
            raise ConfigError(f"{path}: must be [min, max] with min <= max, got {list(pair)}")
    if t.mixup is not None and not (t.mixup.mixupAlpha or t.mixup.cutmixAlpha or t.mixup.cutmixMinmax):
        raise ConfigError(
            "training.mixup: mixupAlpha and cutmixAlpha are both 0, so nothing would be mixed; set one "
            "above 0 or remove training.mixup"
        )
    if t.mixup is not None and t.batchSize % 2:
        # timm's Mixup mixes sample i with sample n-1-i and asserts an even batch, in every mode.
        fits = f"{t.batchSize + 1} or {t.batchSize - 1}" if t.batchSize > 1 else "2"
        raise ConfigError(
            f"training.batchSize: training.mixup (mode {t.mixup.mode}) needs an even micro-batch, got "
            f"{t.batchSize}; set training.batchSize to {fits}, or remove training.mixup"
        )


def _check_fields(cls: type, prefix: str, values: Any) -> None:
    """Declared checks (required, bounds, choices) of one section or nested object, recursively."""
    for f in dataclasses.fields(cls):
        fs = field_spec(f)
        path, value = f"{prefix}.{f.name}", getattr(values, f.name)
        if fs.required and not value:
            raise ConfigError(f"{path}: required ({fs.doc.split(';')[0].split(', e.g.')[0]})")
        if fs.nested is not None:
            if value is not None:
                _check_fields(fs.nested, path, value)
            continue
        problem = fs.check(path, value)
        if problem:
            close = difflib.get_close_matches(str(value), fs.choices, n=1) if fs.choices else []
            raise ConfigError(problem + (f"; did you mean {close[0]}?" if close else ""))


def resume_changes(old_spec: Mapping[str, Any], new: JobConfig) -> tuple[str | None, list[str]]:
    """Compare a checkpoint's spec with the current one: (refusal message or None, applied changes).

    A run-defining field that differs gives the message (field, old and new values, the fix); extending
    or observing fields are returned as `field: old -> new` lines to log. A field the checkpoint's spec
    lacks (written before the field existed) counts as its default.
    """
    new_spec = new.to_spec()
    applied: list[str] = []
    for dotted, f, fs in all_field_specs():
        found, before = _lookup(old_spec, dotted, default_of(f))
        if not found:
            continue  # inside an object the checkpoint did not have: the object itself differs
        after = _lookup(new_spec, dotted, None)[1]
        if fs.nested is not None and before is not None and after is not None:
            continue  # both set: their fields are compared one by one
        if before == after:
            continue
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


def _lookup(spec: Mapping[str, Any], dotted: str, default: Any) -> tuple[bool, Any]:
    """(whether the path's parent object exists, the value or `default` when the key is missing)."""
    node: Any = spec
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            # A missing section counts as all defaults (its objects unset); a missing object as unset.
            return len(parents) == 1, default
    return True, node.get(leaf, default) if isinstance(node, Mapping) else default


def resume_mismatch(old_spec: Mapping[str, Any], new: JobConfig) -> str | None:
    """First run-defining field that differs between a checkpoint's spec and the current one, as a message."""
    return resume_changes(old_spec, new)[0]


# Reading manifests lives in manifest.py; these names stay importable from here (cli, tests, benches).
from kubetune_trainer.manifest import load_job, parse_spec, set_path  # noqa: E402

__all__ = ["ConfigError", "JobConfig", "load_job", "parse_spec", "resume_changes", "set_path", "validate"]
