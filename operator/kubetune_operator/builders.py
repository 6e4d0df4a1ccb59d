"""Pure builders: the desired children of a FineTuneJob for (job, attempt), as plain dicts.

Names are deterministic, so a restarted operator recreates exactly the same objects and treats
AlreadyExists as success; nothing here talks to the API.
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import yaml

from kubetune_operator.api import (
    API_VERSION,
    CHECKPOINT_MOUNT,
    CONFIG_MOUNT,
    DATA_MOUNT,
    JOB_FILE,
    KIND,
    OPERATOR_ONLY_NESTED,
    TENSORBOARD_DIR,
    TENSORBOARD_PORT,
    FineTuneJob,
    JobRef,
)

LABEL_JOB = "kubetune.io/job-name"
LABEL_ATTEMPT = "kubetune.io/attempt"
LABEL_RANK = "kubetune.io/rank"
LABEL_COMPONENT = "app.kubernetes.io/component"
# On the pod that serves the job's TensorBoard (the standalone server, or rank 0 with the sidecar):
# the Service selects it, so port-forwarding keeps working whichever pod serves.
LABEL_TENSORBOARD = "kubetune.io/tensorboard"
TENSORBOARD_CONTAINER = "tensorboard"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubetune", "app.kubernetes.io/name": "kubetune"}
RENDEZVOUS_PORT = 29500
# Seconds torchrun waits for workers after forwarding SIGTERM; the rest of the grace period is margin.
TORCHRUN_MARGIN_SECONDS = 5


def _fit(base: str, suffix: str = "", limit: int = 63) -> str:
    """`base + suffix` cut to `limit` characters, with a stable hash so distinct long names stay distinct."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    # No '-' or '.' before the hash: '.-' is not valid in a DNS name, and a label value must end alphanumeric.
    return f"{base[:keep].rstrip('-.')}-{digest}{suffix}"


def job_label(name: str) -> str:
    """The `kubetune.io/job-name` label value (label values are limited to 63 characters)."""
    return _fit(name)


def pvc_name(name: str) -> str:
    return _fit(name, "-ckpt")


def configmap_name(name: str) -> str:
    return _fit(name, "-job")


def service_name(name: str) -> str:
    return _fit(name, "-workers")


def tensorboard_name(name: str) -> str:
    """The TensorBoard Service and its standalone pod."""
    return _fit(name, "-tensorboard")


def pod_name(name: str, attempt: int, rank: int) -> str:
    """`<job>-a<attempt>-<rank>`: also the pod's hostname, so it must be a 63-character DNS label."""
    return _fit(name, f"-a{attempt}-{rank}")


def run_id(uid: str) -> str:
    """W&B run id derived from the job UID: every attempt of the job logs to the same run."""
    return "ftj-" + hashlib.sha256(uid.encode()).hexdigest()[:16]


def owner_reference(ref: JobRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ref.name,
        "uid": ref.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(job: FineTuneJob, name: str, extra_labels: dict[str, str] | None = None) -> dict[str, Any]:
    labels = {**MANAGED_BY, LABEL_JOB: job_label(job.ref.name), **(extra_labels or {})}
    return {
        "name": name,
        "namespace": job.ref.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(job.ref)],
    }


def checkpoint_pvc(job: FineTuneJob) -> dict[str, Any] | None:
    """The checkpoint volume claim, or None when the job brings its own (`checkpoint.existingClaim`).

    With `retainOnDelete` the claim carries no owner reference, so deleting the job keeps the checkpoints.
    """
    ckpt = job.spec.checkpoint
    if ckpt.existing_claim:
        return None
    meta = _meta(job, pvc_name(job.ref.name), {LABEL_COMPONENT: "checkpoints"})
    if ckpt.retain_on_delete:
        del meta["ownerReferences"]
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"] if job.spec.workers == 1 else ["ReadWriteMany"],
        "resources": {"requests": {"storage": ckpt.size}},
    }
    if ckpt.storage_class_name:
        spec["storageClassName"] = ckpt.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def trainer_document(job: FineTuneJob) -> dict[str, Any]:
    """The FineTuneJob manifest the trainer reads: the trainer's sections, data path inside the data mount."""
    spec: dict[str, Any] = copy.deepcopy(dict(job.spec.trainer))
    for section, keys in OPERATOR_ONLY_NESTED.items():
        for key in keys:
            if isinstance(spec.get(section), dict):
                spec[section].pop(key, None)
    data = spec.setdefault("data", {})
    if job.spec.data_claim:
        # data.path is relative to the dataset claim, which is mounted at DATA_MOUNT.
        path = str(data.get("path") or "")
        if path != DATA_MOUNT and not path.startswith(DATA_MOUNT + "/"):
            path = f"{DATA_MOUNT}/{path.lstrip('/')}".rstrip("/")
        data["path"] = path
    if not data:
        del spec["data"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.ref.name, "namespace": job.ref.namespace},
        "spec": spec,
    }


def trainer_configmap(job: FineTuneJob) -> dict[str, Any]:
    doc = yaml.safe_dump(trainer_document(job), sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, configmap_name(job.ref.name), {LABEL_COMPONENT: "config"}),
        "data": {JOB_FILE: doc},
    }


def headless_service(job: FineTuneJob) -> dict[str, Any] | None:
    """DNS for torchrun's rendezvous between workers; none for single-pod jobs."""
    if job.spec.workers <= 1:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, service_name(job.ref.name), {LABEL_COMPONENT: "rendezvous"}),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job_label(job.ref.name), LABEL_COMPONENT: "trainer"},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def _env(job: FineTuneJob, attempt: int, rank: int) -> list[dict[str, Any]]:
    ref, spec = job.ref, job.spec
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_JOB", "value": ref.name},
        {"name": "KUBETUNE_NAMESPACE", "value": ref.namespace},
        {"name": "KUBETUNE_RUN_ID", "value": run_id(ref.uid)},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "KUBETUNE_CHECKPOINT_DIR", "value": CHECKPOINT_MOUNT},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": "/dev/termination-log"},
        {"name": "WANDB_DIR", "value": CHECKPOINT_MOUNT},
        {"name": "HOME", "value": "/tmp"},
    ]
    if spec.wandb_secret:
        ref_ = {"name": spec.wandb_secret.name, "key": spec.wandb_secret.key}
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": ref_}})
    if spec.distributed:
        master = f"{pod_name(ref.name, attempt, 0)}.{service_name(ref.name)}"
        env += [
            {"name": "PET_NNODES", "value": str(spec.workers)},
            {"name": "PET_NODE_RANK", "value": str(rank)},
            {"name": "PET_NPROC_PER_NODE", "value": str(spec.procs_per_worker)},
            {"name": "PET_MASTER_ADDR", "value": master if spec.workers > 1 else "127.0.0.1"},
            {"name": "PET_MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
        ]
    env += [{"name": k, "value": v} for k, v in spec.pod_template.env]
    return env


def _container(job: FineTuneJob, attempt: int, rank: int) -> dict[str, Any]:
    spec = job.spec
    job_file = f"{CONFIG_MOUNT}/{JOB_FILE}"
    limits: dict[str, str] = {}
    requests: dict[str, str] = {}
    if spec.resources.gpus:
        limits[spec.resources.gpu_resource] = str(spec.resources.gpus)
        requests[spec.resources.gpu_resource] = str(spec.resources.gpus)
    if spec.resources.cpu:
        requests["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        requests["memory"] = spec.resources.memory
        limits["memory"] = spec.resources.memory
    mounts = [
        {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
        {"name": "job", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    if spec.data_claim:
        mounts.append({"name": "data", "mountPath": DATA_MOUNT, "readOnly": True})
    container: dict[str, Any] = {
        "name": "trainer",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "args": ["-f", job_file],
        "env": _env(job, attempt, rank),
        "resources": {k: v for k, v in (("limits", limits), ("requests", requests)) if v},
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }
    if spec.distributed:
        shutdown = max(1, spec.termination_grace_period_seconds - TORCHRUN_MARGIN_SECONDS)
        # torchrun through kubetune_trainer.launch: a preempted gang exits 143, a bad config 2 (torchrun: 1).
        container["command"] = ["tini", "--", "python", "-m", "kubetune_trainer.launch"]
        container["args"] = ["--shutdown-timeout", str(shutdown), "-m", "kubetune_trainer", "-f", job_file]
    if spec.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"}]
    if spec.workers > 1:
        container.setdefault("ports", []).append(
            {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}
        )
    return container


def _container_security() -> dict[str, Any]:
    """Every container the operator creates meets the `restricted` Pod Security Standard."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 65532,  # the trainer image's user
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _user_labels(job: FineTuneJob) -> dict[str, str]:
    """podTemplate labels, without the serving label: only the operator says which pod serves."""
    return {k: v for k, v in job.spec.pod_template.labels.items() if k != LABEL_TENSORBOARD}


def trainer_pod(
    job: FineTuneJob, attempt: int, rank: int, tensorboard_sidecar: bool = False
) -> dict[str, Any]:
    """Pod `rank` of `attempt` (1-based). Restart policy Never: the operator, not the kubelet, retries.

    `tensorboard_sidecar` (rank 0 only) adds the TensorBoard server as a native sidecar: it serves while
    the attempt runs, and the kubelet stops it once the trainer container exits, so the pod completes."""
    spec = job.spec
    name = pod_name(job.ref.name, attempt, rank)
    sidecar = tensorboard_sidecar and rank == 0
    extra = {LABEL_ATTEMPT: str(attempt), LABEL_RANK: str(rank), LABEL_COMPONENT: "trainer"}
    if sidecar:
        extra[LABEL_TENSORBOARD] = "true"
    meta = _meta(job, name, extra)
    meta["labels"] = {**_user_labels(job), **meta["labels"]}
    annotations = dict(spec.pod_template.annotations)
    if spec.metrics_port:
        annotations.update(
            {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(spec.metrics_port),
                "prometheus.io/path": "/metrics",
            }
        )
    if annotations:
        meta["annotations"] = annotations
    claim = spec.checkpoint.existing_claim or pvc_name(job.ref.name)
    volumes: list[dict[str, Any]] = [
        {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "job", "configMap": {"name": configmap_name(job.ref.name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    if spec.data_claim:
        volumes.append(
            {"name": "data", "persistentVolumeClaim": {"claimName": spec.data_claim, "readOnly": True}}
        )
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.termination_grace_period_seconds,
        "automountServiceAccountToken": spec.automount_service_account_token,  # off unless the job asks
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "containers": [_container(job, attempt, rank)],
        "volumes": volumes,
    }
    if sidecar:
        pod_spec["initContainers"] = [_tensorboard_container(job, sidecar=True)]
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.workers > 1:
        pod_spec["hostname"] = name
        pod_spec["subdomain"] = service_name(job.ref.name)
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        pod_spec["affinity"] = copy.deepcopy(dict(spec.affinity))
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}


def attempt_pods(job: FineTuneJob, attempt: int, tensorboard_sidecar: bool = False) -> list[dict[str, Any]]:
    """Every pod of one attempt: the gang that starts (and restarts) together."""
    return [trainer_pod(job, attempt, rank, tensorboard_sidecar) for rank in range(job.spec.workers)]


# -- TensorBoard ----------------------------------------------------------------------------------------
_TENSORBOARD_ARGS = ["--logdir", TENSORBOARD_DIR, "--bind_all", "--port", str(TENSORBOARD_PORT)]
# The sidecar must never keep the trainer from starting: the kubelet starts the pod's main containers
# only once every sidecar runs, so a server that exits at once (an image without tensorboard, a crash)
# would block the attempt. The loop keeps the container running and retries; `tini -g` passes SIGTERM
# to the whole group, so the sidecar stops at once when the trainer exits or the pod is deleted.
_SIDECAR_SCRIPT = (
    'while :; do "$0" "$@"; echo "tensorboard exited with $?; retrying in 10s" >&2; sleep 10; done'
)


def _tensorboard_container(job: FineTuneJob, sidecar: bool) -> dict[str, Any]:
    """The TensorBoard server: the trainer image (tensorboard is in its venv), the checkpoint volume
    read-only, a read-only root filesystem with /tmp an emptyDir, small requests, ready when / answers."""
    command = ["tini", "--", "tensorboard", *_TENSORBOARD_ARGS]
    if sidecar:
        command = ["tini", "-g", "--", "sh", "-c", _SIDECAR_SCRIPT, "tensorboard", *_TENSORBOARD_ARGS]
    container: dict[str, Any] = {
        "name": TENSORBOARD_CONTAINER,
        "image": job.spec.image,
        "imagePullPolicy": job.spec.image_pull_policy,
        "command": command,  # the image's entrypoint is the trainer
        "env": [{"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "tensorboard", "containerPort": TENSORBOARD_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/", "port": TENSORBOARD_PORT},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"memory": "1Gi"},  # a runaway board must not take the trainer's node memory
        },
        "volumeMounts": [
            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": _container_security(),
    }
    if sidecar:
        container["restartPolicy"] = "Always"  # a native sidecar (Kubernetes 1.29+; GA in 1.33)
    return container


def tensorboard_service(job: FineTuneJob) -> dict[str, Any]:
    """`<job>-tensorboard`, port 6006: whichever pod serves (standalone or the rank-0 sidecar)."""
    name = tensorboard_name(job.ref.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, name, {LABEL_COMPONENT: "tensorboard"}),
        "spec": {
            "type": "ClusterIP",
            "selector": {LABEL_JOB: job_label(job.ref.name), LABEL_TENSORBOARD: "true"},
            # A numeric targetPort: kubectl port-forward resolves named ports in regular containers only,
            # and the sidecar is an init container.
            "ports": [
                {"name": "http", "port": TENSORBOARD_PORT, "targetPort": TENSORBOARD_PORT, "protocol": "TCP"}
            ],
        },
    }


def tensorboard_pod(job: FineTuneJob) -> dict[str, Any]:
    """The standalone server `<job>-tensorboard`: mounts the checkpoint claim read-only.

    No node selector, affinity or tolerations: it needs no GPU, and on a spot GPU node it would keep
    that node from scaling down. The kubelet restarts its container; the operator recreates the pod."""
    spec = job.spec
    name = tensorboard_name(job.ref.name)
    meta = _meta(job, name, {LABEL_COMPONENT: "tensorboard", LABEL_TENSORBOARD: "true"})
    meta["labels"] = {**_user_labels(job), **meta["labels"]}
    claim = spec.checkpoint.existing_claim or pvc_name(job.ref.name)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 10,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(),
        "containers": [_tensorboard_container(job, sidecar=False)],
        "volumes": [
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if spec.service_account_name:  # it may carry the imagePullSecrets for the trainer image
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}
