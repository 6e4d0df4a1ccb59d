"""The FineTuneJob API as the operator sees it: the raw resource dict parsed once into frozen dataclasses.

The API server already enforces the CRD's schema and CEL rules; `validate()` here re-checks what the
operator relies on, so a job created while the CRD was older (or by a client that skipped validation)
fails with a readable message instead of a crash in a builder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.config import OPERATOR_ONLY_FIELDS, SECTIONS  # pure: no torch, no timm

GROUP = "kubetune.io"
VERSION = "v1alpha1"
PLURAL = "finetunejobs"
KIND = "FineTuneJob"
API_VERSION = f"{GROUP}/{VERSION}"
JobKey = tuple[str, str]  # (namespace, name) of a FineTuneJob

# Spec sections the trainer reads (the trainer's own config module owns their fields and defaults).
TRAINER_SECTIONS = tuple(SECTIONS)
# Fields inside trainer sections that only the operator uses; the trainer accepts and ignores them.
OPERATOR_ONLY_NESTED = {section: tuple(sorted(keys)) for section, keys in OPERATOR_ONLY_FIELDS.items()}

DATA_MOUNT = "/data"
CHECKPOINT_MOUNT = "/checkpoints"
CONFIG_MOUNT = "/etc/kubetune"
JOB_FILE = "job.yaml"
# Where the trainer writes TensorBoard event files (the checkpoint volume's tensorboard/ folder).
TENSORBOARD_DIR = f"{CHECKPOINT_MOUNT}/tensorboard"
TENSORBOARD_PORT = 6006

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class SpecError(ValueError):
    """A FineTuneJob spec the operator cannot run. The message names the field and the fix."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field_path = field_path


@dataclass(frozen=True)
class Resources:
    """Per-worker compute. `gpus` GPUs of `gpu_resource` each (0 = CPU only)."""

    gpus: int = 1
    cpu: str | None = None
    memory: str | None = None
    gpu_resource: str = "nvidia.com/gpu"


@dataclass(frozen=True)
class CheckpointStorage:
    """Where checkpoints live: a PVC the operator creates (`size`, `storage_class_name`) or `existing_claim`."""

    size: str = "10Gi"
    storage_class_name: str | None = None
    existing_claim: str | None = None
    retain_on_delete: bool = False


@dataclass(frozen=True)
class TensorBoard:
    """`enabled`: the trainer writes event files. `serve`: the operator serves them (Service + pod)."""

    enabled: bool = True
    serve: bool = False


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = "api-key"


@dataclass(frozen=True)
class PodTemplate:
    """Extra labels, annotations and env for every trainer pod."""

    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RunPolicy:
    """How many failures and preemptions a job may take, its deadline, TTL and suspension."""

    backoff_limit: int = 3
    max_preemptions: int | None = None
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    suspend: bool = False


@dataclass(frozen=True)
class JobSpec:
    """What the operator needs from `spec`. `trainer` keeps the trainer's sections verbatim."""

    image: str
    image_pull_policy: str = "IfNotPresent"
    workers: int = 1
    resources: Resources = field(default_factory=Resources)
    data_claim: str | None = None
    checkpoint: CheckpointStorage = field(default_factory=CheckpointStorage)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None
    service_account_name: str | None = None
    automount_service_account_token: bool = False
    termination_grace_period_seconds: int = 60
    pod_template: PodTemplate = field(default_factory=PodTemplate)
    wandb_secret: SecretRef | None = None
    metrics_port: int = 9400
    tensorboard: TensorBoard = field(default_factory=TensorBoard)
    run_policy: RunPolicy = field(default_factory=RunPolicy)
    trainer: Mapping[str, Any] = field(default_factory=dict)

    @property
    def procs_per_worker(self) -> int:
        """Processes per pod: one per GPU, one on CPU-only pods."""
        return max(1, self.resources.gpus)

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or self.procs_per_worker > 1

    def validate(self) -> None:
        """Raise SpecError for anything the builders cannot turn into valid children."""
        if not self.image:
            raise SpecError(
                "spec.image", "no trainer image: set spec.image or the operator's --trainer-image"
            )
        if not 1 <= self.workers <= 64:
            raise SpecError("spec.workers", f"must be between 1 and 64, got {self.workers}")
        if not 0 <= self.resources.gpus <= 8:
            raise SpecError(
                "spec.resources.gpus", f"must be between 0 and 8 per worker, got {self.resources.gpus}"
            )
        if not 1 <= self.termination_grace_period_seconds <= 3600:
            raise SpecError(
                "spec.terminationGracePeriodSeconds",
                f"must be between 1 and 3600, got {self.termination_grace_period_seconds}",
            )
        if self.run_policy.backoff_limit < 0:
            raise SpecError("spec.runPolicy.backoffLimit", "must be >= 0")
        if not isinstance(self.trainer.get("model"), Mapping) or not self.trainer["model"].get("name"):
            raise SpecError("spec.model.name", "is required: name a timm model, e.g. resnet50")
        if self.checkpoint.existing_claim is not None and not _DNS1123_LABEL.match(
            self.checkpoint.existing_claim
        ):
            raise SpecError(
                "spec.checkpoint.existingClaim", "must be the name of a PVC in the job's namespace"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise SpecError("spec.metrics.port", f"must be between 0 and 65535, got {self.metrics_port}")


@dataclass(frozen=True)
class JobRef:
    """Identity of one FineTuneJob object."""

    name: str
    namespace: str
    uid: str
    generation: int = 1


@dataclass(frozen=True)
class FineTuneJob:
    ref: JobRef
    spec: JobSpec


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name) or {}
    if not isinstance(value, Mapping):
        raise SpecError(f"spec.{name}", f"must be an object, got {type(value).__name__}")
    return value


def _int(raw: Mapping[str, Any], key: str, path: str, default: int | None) -> int | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(path, f"must be an integer, got {value!r}")
    return value


def _int_or(raw: Mapping[str, Any], key: str, path: str, default: int) -> int:
    value = _int(raw, key, path, default)
    return default if value is None else value


def parse_spec(raw: Mapping[str, Any], default_image: str = "") -> JobSpec:
    """Turn `spec` into a JobSpec. Raises SpecError naming the field when a value has the wrong shape."""
    res = _section(raw, "resources")
    ckpt = _section(raw, "checkpoint")
    storage = ckpt.get("storage") or {}
    data = _section(raw, "data")
    wandb = _section(raw, "wandb")
    metrics = _section(raw, "metrics")
    board = _section(raw, "tensorboard")
    policy = _section(raw, "runPolicy")
    tmpl = _section(raw, "podTemplate")
    secret = wandb.get("apiKeySecretRef")
    env = tuple((str(e.get("name", "")), str(e.get("value", ""))) for e in tmpl.get("env") or ())
    trainer = {k: raw[k] for k in TRAINER_SECTIONS if k in raw}
    spec = JobSpec(
        image=str(raw.get("image") or default_image),
        image_pull_policy=str(raw.get("imagePullPolicy") or "IfNotPresent"),
        workers=_int_or(raw, "workers", "spec.workers", 1),
        resources=Resources(
            gpus=_int_or(res, "gpus", "spec.resources.gpus", 1),
            cpu=res.get("cpu"),
            memory=res.get("memory"),
            gpu_resource=str(res.get("gpuResource") or "nvidia.com/gpu"),
        ),
        data_claim=data.get("claimName"),
        checkpoint=CheckpointStorage(
            size=str(storage.get("size") or "10Gi"),
            storage_class_name=storage.get("storageClassName"),
            existing_claim=ckpt.get("existingClaim"),
            retain_on_delete=bool(ckpt.get("retainOnDelete", False)),
        ),
        node_selector=dict(raw.get("nodeSelector") or {}),
        tolerations=tuple(raw.get("tolerations") or ()),
        affinity=raw.get("affinity"),
        priority_class_name=raw.get("priorityClassName"),
        service_account_name=raw.get("serviceAccountName"),
        automount_service_account_token=bool(raw.get("automountServiceAccountToken", False)),
        termination_grace_period_seconds=_int_or(
            raw, "terminationGracePeriodSeconds", "spec.terminationGracePeriodSeconds", 60
        ),
        pod_template=PodTemplate(
            labels=dict(tmpl.get("labels") or {}), annotations=dict(tmpl.get("annotations") or {}), env=env
        ),
        wandb_secret=SecretRef(name=secret["name"], key=secret.get("key") or "api-key") if secret else None,
        metrics_port=_int_or(metrics, "port", "spec.metrics.port", 9400),
        tensorboard=TensorBoard(
            enabled=bool(board.get("enabled", True)), serve=bool(board.get("serve", False))
        ),
        run_policy=RunPolicy(
            backoff_limit=_int_or(policy, "backoffLimit", "spec.runPolicy.backoffLimit", 3),
            max_preemptions=_int(policy, "maxPreemptions", "spec.runPolicy.maxPreemptions", None),
            active_deadline_seconds=_int(
                policy, "activeDeadlineSeconds", "spec.runPolicy.activeDeadlineSeconds", None
            ),
            ttl_seconds_after_finished=_int(
                policy, "ttlSecondsAfterFinished", "spec.runPolicy.ttlSecondsAfterFinished", None
            ),
            suspend=bool(policy.get("suspend", False)),
        ),
        trainer=trainer,
    )
    spec.validate()
    return spec


def parse_job(body: Mapping[str, Any], default_image: str = "") -> FineTuneJob:
    """Parse a whole FineTuneJob object (as the API returns it)."""
    meta = body.get("metadata") or {}
    ref = JobRef(
        name=meta["name"],
        namespace=meta.get("namespace") or "default",
        uid=meta.get("uid") or "",
        generation=int(meta.get("generation") or 1),
    )
    return FineTuneJob(ref=ref, spec=parse_spec(body.get("spec") or {}, default_image))
