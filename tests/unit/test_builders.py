"""Pure builders: children of a FineTuneJob, no cluster needed."""

from __future__ import annotations

import pytest
import yaml

from kubetune_operator import builders
from kubetune_operator.api import SpecError, parse_job

pytestmark = pytest.mark.unit


def job(**spec_overrides):
    spec = {
        "image": "kubetune/trainer:0.1.0",
        "model": {"name": "resnet50", "numClasses": 10},
        "data": {"claimName": "digits", "path": "imagefolder"},
        "training": {"epochs": 2},
    }
    spec.update(spec_overrides)
    body = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "ml", "uid": "1234-abcd", "generation": 1},
        "spec": spec,
    }
    return parse_job(body)


def test_pod_names_are_deterministic_and_fit_dns_labels():
    assert builders.pod_name("demo", 3, 1) == "demo-a3-1"
    long = "x" * 80
    a, b = builders.pod_name(long, 12, 0), builders.pod_name(long + "y", 12, 0)
    assert len(a) <= 63 and a.endswith("-a12-0") and a != b
    assert builders.pod_name(long, 12, 0) == a
    assert len(builders.job_label(long)) <= 63


def test_single_worker_pod_shape():
    pod = builders.trainer_pod(job(), attempt=2, rank=0)
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "demo-a2-0"
    assert meta["labels"][builders.LABEL_JOB] == "demo"
    assert meta["labels"][builders.LABEL_ATTEMPT] == "2"
    assert meta["ownerReferences"][0]["uid"] == "1234-abcd" and meta["ownerReferences"][0]["controller"]
    assert meta["annotations"]["prometheus.io/port"] == "9400"
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["terminationGracePeriodSeconds"] == 60
    c = spec["containers"][0]
    assert c["args"] == ["-f", "/etc/kubetune/job.yaml"] and "command" not in c
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["terminationMessagePath"] == "/dev/termination-log"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBETUNE_RUN_ID"] == builders.run_id("1234-abcd")
    assert env["KUBETUNE_CHECKPOINT_DIR"] == "/checkpoints"
    assert "PET_NNODES" not in env and "WANDB_API_KEY" not in env
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "demo-ckpt"
    assert vols["data"]["persistentVolumeClaim"] == {"claimName": "digits", "readOnly": True}


def test_run_id_is_stable_per_job_uid():
    assert builders.run_id("u1") == builders.run_id("u1") != builders.run_id("u2")


def test_multi_worker_gang_gets_torchrun_and_headless_service():
    j = job(workers=3, resources={"gpus": 2}, terminationGracePeriodSeconds=90)
    pods = builders.attempt_pods(j, 4)
    assert [p["metadata"]["name"] for p in pods] == ["demo-a4-0", "demo-a4-1", "demo-a4-2"]
    c = pods[2]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PET_NNODES"] == "3" and env["PET_NODE_RANK"] == "2" and env["PET_NPROC_PER_NODE"] == "2"
    assert env["PET_MASTER_ADDR"] == "demo-a4-0.demo-workers"
    assert c["command"] == ["tini", "--", "python", "-m", "kubetune_trainer.launch"]
    assert c["args"][:2] == ["--shutdown-timeout", "85"]
    assert pods[0]["spec"]["subdomain"] == "demo-workers" and pods[0]["spec"]["hostname"] == "demo-a4-0"
    svc = builders.headless_service(j)
    assert svc is not None and svc["spec"]["clusterIP"] == "None"
    assert builders.headless_service(job()) is None


def test_pvc_existing_claim_and_retain():
    pvc = builders.checkpoint_pvc(job(checkpoint={"storage": {"size": "20Gi", "storageClassName": "fast"}}))
    assert pvc is not None and pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    assert pvc["spec"]["storageClassName"] == "fast" and pvc["metadata"]["ownerReferences"]
    assert builders.checkpoint_pvc(job(checkpoint={"existingClaim": "mine"})) is None
    kept = builders.checkpoint_pvc(job(checkpoint={"retainOnDelete": True}))
    assert kept is not None and "ownerReferences" not in kept["metadata"]
    pod = builders.trainer_pod(job(checkpoint={"existingClaim": "mine"}), 1, 0)
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"]["claimName"] == "mine"


def test_trainer_document_strips_operator_fields_and_mounts_data():
    j = job(
        checkpoint={"everySteps": 50, "existingClaim": "mine"},
        wandb={"mode": "offline", "apiKeySecretRef": {"name": "wb"}},
    )
    doc = yaml.safe_load(builders.trainer_configmap(j)["data"]["job.yaml"])
    assert doc["metadata"] == {"name": "demo", "namespace": "ml"}
    assert doc["spec"]["checkpoint"] == {"everySteps": 50}
    assert doc["spec"]["wandb"] == {"mode": "offline"}
    assert doc["spec"]["data"] == {"path": "/data/imagefolder"}
    assert "image" not in doc["spec"]


def test_wandb_key_only_from_secret_ref():
    j = job(wandb={"mode": "online", "apiKeySecretRef": {"name": "wb", "key": "token"}})
    env = builders.trainer_pod(j, 1, 0)["spec"]["containers"][0]["env"]
    key = next(e for e in env if e["name"] == "WANDB_API_KEY")
    assert key == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wb", "key": "token"}}}


def test_scheduling_fields_pass_through():
    tol = [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
    j = job(
        nodeSelector={"pool": "spot"},
        tolerations=tol,
        priorityClassName="low",
        podTemplate={"labels": {"team": "a"}, "env": [{"name": "X", "value": "1"}]},
    )
    pod = builders.trainer_pod(j, 1, 0)
    assert pod["spec"]["nodeSelector"] == {"pool": "spot"}
    assert pod["spec"]["tolerations"] == tol
    assert pod["spec"]["priorityClassName"] == "low"
    assert pod["metadata"]["labels"]["team"] == "a"
    assert {"name": "X", "value": "1"} in pod["spec"]["containers"][0]["env"]


def test_service_account_token_only_when_the_job_asks():
    """Naming a ServiceAccount (e.g. for its image pull secrets) does not mount its API token: only
    spec.automountServiceAccountToken does, and the TensorBoard server never gets one."""
    named = builders.trainer_pod(job(serviceAccountName="puller"), 1, 0)["spec"]
    assert named["serviceAccountName"] == "puller" and named["automountServiceAccountToken"] is False
    asked = job(serviceAccountName="k8s-client", automountServiceAccountToken=True)
    assert asked.spec.automount_service_account_token is True
    assert all(p["spec"]["automountServiceAccountToken"] is True for p in builders.attempt_pods(asked, 1))
    assert builders.tensorboard_pod(asked)["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"image": ""}, "spec.image"),
        ({"workers": 0}, "spec.workers"),
        ({"workers": "two"}, "spec.workers"),
        ({"resources": {"gpus": 9}}, "spec.resources.gpus"),
        ({"model": {}}, "spec.model.name"),
        ({"terminationGracePeriodSeconds": 0}, "spec.terminationGracePeriodSeconds"),
        ({"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
        ({"metrics": {"port": 70000}}, "spec.metrics.port"),
        ({"checkpoint": {"existingClaim": "Not_A_Name"}}, "spec.checkpoint.existingClaim"),
        ({"resources": "lots"}, "spec.resources"),
    ],
)
def test_bad_specs_name_the_field(overrides, field):
    with pytest.raises(SpecError) as err:
        job(**overrides)
    assert err.value.field_path == field
    assert str(err.value).startswith(field)


# -- TensorBoard -----------------------------------------------------------------------------------------
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
TB_ARGS = ["--logdir", "/checkpoints/tensorboard", "--bind_all", "--port", "6006"]


def served(**spec):
    return job(tensorboard={"serve": True}, **spec)


def test_tensorboard_service_selects_whichever_pod_serves():
    svc = builders.tensorboard_service(served())
    meta, spec = svc["metadata"], svc["spec"]
    assert meta["name"] == "demo-tensorboard" and meta["namespace"] == "ml"
    assert meta["ownerReferences"][0]["uid"] == "1234-abcd"
    assert spec["type"] == "ClusterIP"
    assert spec["selector"] == {builders.LABEL_JOB: "demo", builders.LABEL_TENSORBOARD: "true"}
    assert spec["ports"] == [{"name": "http", "port": 6006, "targetPort": 6006, "protocol": "TCP"}]
    long = builders.tensorboard_name("x" * 80)
    assert len(long) <= 63 and long.endswith("-tensorboard")


def test_standalone_tensorboard_pod_mounts_the_claim_read_only():
    pod = builders.tensorboard_pod(
        served(
            checkpoint={"existingClaim": "shared"},
            tolerations=[{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
            nodeSelector={"pool": "gpu"},
            serviceAccountName="puller",
            podTemplate={"labels": {"team": "a", builders.LABEL_TENSORBOARD: "false"}},
        )
    )
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == "demo-tensorboard"
    assert meta["labels"][builders.LABEL_TENSORBOARD] == "true" and meta["labels"]["team"] == "a"
    assert meta["labels"][builders.LABEL_COMPONENT] == "tensorboard"
    assert meta["ownerReferences"][0]["kind"] == "FineTuneJob"
    svc = builders.tensorboard_service(served())
    assert svc["spec"]["selector"].items() <= meta["labels"].items()
    assert spec["restartPolicy"] == "Always" and spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "puller"  # it may hold the trainer image's pull secret
    # Needs no GPU: never placed (or kept) on the trainers' spot GPU nodes.
    assert not {"tolerations", "nodeSelector", "affinity", "priorityClassName"} & set(spec)
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["checkpoints"]["persistentVolumeClaim"] == {"claimName": "shared", "readOnly": True}
    assert vols["tmp"] == {"name": "tmp", "emptyDir": {}}
    (c,) = spec["containers"]
    assert c["name"] == "tensorboard" and c["image"] == "kubetune/trainer:0.1.0"
    assert c["command"] == ["tini", "--", "tensorboard", *TB_ARGS]  # not the trainer entrypoint
    assert "restartPolicy" not in c
    assert c["ports"] == [{"name": "tensorboard", "containerPort": 6006, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"] == {"path": "/", "port": 6006}
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["checkpoints"] == {"name": "checkpoints", "mountPath": "/checkpoints", "readOnly": True}
    assert mounts["tmp"]["mountPath"] == "/tmp"
    own = builders.tensorboard_pod(served(workers=2))
    claim = {v["name"]: v for v in own["spec"]["volumes"]}["checkpoints"]["persistentVolumeClaim"]
    assert claim == {"claimName": "demo-ckpt", "readOnly": True}


def test_rank0_trainer_pod_gets_the_tensorboard_sidecar():
    j = served(workers=2, resources={"gpus": 1})
    rank0, rank1 = builders.attempt_pods(j, 3, tensorboard_sidecar=True)
    assert rank0["metadata"]["labels"][builders.LABEL_TENSORBOARD] == "true"
    assert builders.LABEL_TENSORBOARD not in rank1["metadata"]["labels"]
    assert "initContainers" not in rank1["spec"]
    (side,) = rank0["spec"]["initContainers"]
    assert side["name"] == "tensorboard" and side["restartPolicy"] == "Always"  # a native sidecar
    assert rank0["spec"]["restartPolicy"] == "Never"  # the pod still completes when the trainer exits
    assert side["command"][:3] == ["tini", "-g", "--"] and side["command"][-len(TB_ARGS) :] == TB_ARGS
    mounts = {m["name"]: m for m in side["volumeMounts"]}
    assert mounts["checkpoints"]["readOnly"] is True and mounts["tmp"]["mountPath"] == "/tmp"
    assert "nvidia.com/gpu" not in str(side["resources"])
    (trainer,) = rank0["spec"]["containers"]
    assert trainer["name"] == "trainer" and trainer["command"] == [
        "tini",
        "--",
        "python",
        "-m",
        "kubetune_trainer.launch",
    ]
    assert builders.trainer_pod(j, 1, 0) == builders.trainer_pod(job(workers=2, resources={"gpus": 1}), 1, 0)
    # The rendezvous Service selects trainer pods only, never a TensorBoard server.
    svc = builders.headless_service(j)
    assert svc is not None and svc["spec"]["selector"][builders.LABEL_COMPONENT] == "trainer"


def test_sidecar_retries_instead_of_exiting():
    """The kubelet starts the trainer only once the sidecar runs: a tensorboard that exits at once (not in
    the image) must not block training, so the sidecar's shell loops and only SIGTERM ends it."""
    side = builders.trainer_pod(served(), 1, 0, tensorboard_sidecar=True)["spec"]["initContainers"][0]
    assert side["command"][3:5] == ["sh", "-c"] and "while :" in side["command"][5]
    assert side["command"][6:] == ["tensorboard", *TB_ARGS]  # $0 and "$@" of the loop


@pytest.mark.parametrize("kind", ["trainer", "sidecar", "standalone"])
def test_every_container_meets_restricted_pod_security(kind):
    j = served(data={"claimName": "digits"})
    if kind == "standalone":
        pod = builders.tensorboard_pod(j)
    else:
        pod = builders.trainer_pod(j, 1, 0, tensorboard_sidecar=kind == "sidecar")
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    containers = spec["containers"] + spec.get("initContainers", [])
    assert len(containers) == (2 if kind == "sidecar" else 1)
    for c in containers:
        assert c["securityContext"] == RESTRICTED_CONTAINER, c["name"]
    vols = {v["name"] for v in spec["volumes"]}
    for c in containers:  # a read-only root filesystem: every writable path is a volume
        assert {m["name"] for m in c["volumeMounts"]} <= vols
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    assert all("hostPath" not in v for v in spec["volumes"])


def test_tensorboard_spec_parsed_and_serve_kept_from_the_trainer():
    assert job().spec.tensorboard.serve is False and job().spec.tensorboard.enabled is True
    j = job(tensorboard={"enabled": False, "serve": True})
    assert (j.spec.tensorboard.enabled, j.spec.tensorboard.serve) == (False, True)
    doc = yaml.safe_load(builders.trainer_configmap(j)["data"]["job.yaml"])
    assert doc["spec"]["tensorboard"] == {"enabled": False}
    assert "initContainers" not in builders.trainer_pod(j, 1, 0)["spec"]
