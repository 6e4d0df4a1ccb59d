"""The real API server enforces the FineTuneJob schema: bad manifests are rejected naming the field.

The CRD is installed from charts/kubetune/crds/ (the one copy) with our pinned kubectl, exactly as a user
would; every assertion reads kubectl's own output.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeutil import NotYet, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "charts/kubetune/crds"
CRD_NAME = "finetunejobs.kubetune.io"
EXAMPLES = sorted((ROOT / "examples").glob("finetunejob-*.yaml"))

VALID: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"name": "test_resnet", "numClasses": 10},
        "data": {"format": "synthetic", "imageSize": 32},
        "training": {"maxSteps": 50, "batchSize": 8},
        "resources": {"gpus": 0},
    },
}


@pytest.fixture(scope="module")
def crd(kube: Any) -> Any:
    """Install (or update) the CRD with server-side apply and wait until it serves FineTuneJobs."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    kube.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    wait_for(
        lambda: kube.kubectl("get", "ftj", "-A", check=False).returncode == 0,
        timeout=30,
        desc="the ftj resource to be discoverable",
    )
    return kube


def manifest(edit: Callable[[dict[str, Any]], object] | None = None, name: str = "job") -> dict[str, Any]:
    doc = copy.deepcopy(VALID)
    doc["metadata"]["name"] = name
    if edit is not None:
        edit(doc)
    return doc


def apply(kube: Any, namespace: str, doc: dict[str, Any], *extra: str) -> Any:
    return kube.kubectl("apply", "-n", namespace, "-f", "-", *extra, input=yaml.safe_dump(doc), check=False)


def get_job(kube: Any, namespace: str, name: str = "job") -> dict[str, Any]:
    return json.loads(kube.kubectl("get", "ftj", name, "-n", namespace, "-o", "json").stdout)


def merge_patch(kube: Any, namespace: str, body: dict[str, Any], *extra: str, name: str = "job") -> Any:
    args = ("patch", "ftj", name, "-n", namespace, "--type=merge", "-p", json.dumps(body), *extra)
    return kube.kubectl(*args, check=False)


DELETE = object()


def spec_set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Edit that sets spec.<dotted path> (creating parents); value DELETE removes the key."""

    def edit(doc: dict[str, Any]) -> None:
        node = doc["spec"]
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value

    return edit


# --------------------------------------------------------------------------- valid manifests


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_server_dry_run(crd: Any, namespace: str, example: Path) -> None:
    result = crd.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(example), check=False)
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout


def test_defaults_are_filled_in_by_the_server(crd: Any, namespace: str) -> None:
    assert apply(crd, namespace, manifest()).returncode == 0
    spec = get_job(crd, namespace)["spec"]
    assert spec["training"]["batchSize"] == 8  # given
    assert spec["training"]["learningRate"] == 0.001
    assert spec["training"]["optimizer"] == "adamw"
    assert spec["checkpoint"] == {
        "everySteps": 100,
        "everySeconds": 0,
        "keepLast": 2,
        "retainOnDelete": False,
    }
    assert spec["model"]["freeze"] == "none"
    assert spec["wandb"] == {"mode": "disabled"}
    assert spec["metrics"] == {"port": 9400}
    assert spec["workers"] == 1
    assert spec["resources"]["gpuResource"] == "nvidia.com/gpu"
    assert spec["runPolicy"] == {"backoffLimit": 3, "suspend": False}
    assert spec["terminationGracePeriodSeconds"] == 60
    assert "epochs" not in spec["training"]


def test_nested_objects_get_their_defaults_and_stay_off_when_absent(crd: Any, namespace: str) -> None:
    """`augment: {}` means timm's defaults (the trainer reads the same); no augment means none."""
    doc = manifest(spec_set("data.augment", {"autoAugment": "rand-m9-mstd0.5-inc1"}))
    spec_set("checkpoint.best", {})(doc)
    assert apply(crd, namespace, doc).returncode == 0
    spec = get_job(crd, namespace)["spec"]
    aug = spec["data"]["augment"]
    assert aug["scale"] == [0.08, 1.0] and aug["hflip"] == 0.5 and aug["remode"] == "pixel"
    assert aug["autoAugment"] == "rand-m9-mstd0.5-inc1" and "interpolation" not in aug
    assert spec["checkpoint"]["best"] == {"metric": "top1"}
    assert "mixup" not in spec["training"] and "earlyStopping" not in spec["training"]
    assert spec["data"]["sampling"] == "uniform" and spec["evaluation"] == {"everySteps": 0}


def test_null_optional_field_is_dropped(crd: Any, namespace: str) -> None:
    """`epochs: null` means unset (the trainer's None), not an error."""
    doc = manifest(spec_set("training.epochs", None))
    result = apply(crd, namespace, doc)
    assert result.returncode == 0, result.stderr
    assert "epochs" not in get_job(crd, namespace)["spec"]["training"]


@pytest.mark.parametrize(
    "freeze", ["none", "backbone", ["stem", "stages.0"]], ids=["none", "backbone", "list"]
)
def test_freeze_forms_accepted(crd: Any, namespace: str, freeze: Any) -> None:
    """model.freeze is a string-or-list union, constrained by anyOf (see hack/crd/gen_crd.py)."""
    result = apply(crd, namespace, manifest(spec_set("model.freeze", freeze)))
    assert result.returncode == 0, result.stderr
    assert get_job(crd, namespace)["spec"]["model"]["freeze"] == freeze


# --------------------------------------------------------------------------- invalid manifests

# (id, edit, substrings that must all appear in kubectl's stderr)
INVALID: list[tuple[str, Callable[[dict[str, Any]], None], list[str]]] = [
    (
        "negative-epochs",
        spec_set("training.epochs", -1),
        ["spec.training.epochs", "greater than or equal to 1"],
    ),
    (
        "epochs-and-maxSteps",
        spec_set("training.epochs", 3),
        ["spec.training.maxSteps", "set either epochs or maxSteps, not both"],
    ),
    ("unknown-field", spec_set("training.learningrate", 0.1), ['unknown field "spec.training.learningrate"']),
    ("unknown-top-level-field", spec_set("gpus", 1), ['unknown field "spec.gpus"']),
    ("gpus-over-bound", spec_set("resources.gpus", 9), ["spec.resources.gpus", "less than or equal to 8"]),
    ("missing-model", spec_set("model", DELETE), ["spec.model", "Required value"]),
    ("missing-model-name", spec_set("model.name", DELETE), ["spec.model.name", "Required value"]),
    (
        "bad-quantity",
        spec_set("checkpoint.storage", {"size": "ten gigs"}),
        ["spec.checkpoint.storage.size", "must be a positive quantity"],
    ),
    (
        "zero-quantity",
        spec_set("resources.memory", "0"),
        ["spec.resources.memory", "must be a positive quantity"],
    ),
    (
        "storage-and-existingClaim",
        lambda d: d["spec"].update(checkpoint={"storage": {"size": "5Gi"}, "existingClaim": "ckpt"}),
        ["spec.checkpoint", "set either storage or existingClaim, not both"],
    ),
    (
        "bad-enum",
        spec_set("training.scheduler", "cosin"),
        ["spec.training.scheduler", 'Unsupported value: "cosin"'],
    ),
    (
        "optimizer-not-a-name",
        spec_set("training.optimizer", "Adam W"),
        ["spec.training.optimizer", "should match"],
    ),
    (
        "augment-scale-one-number",
        spec_set("data.augment", {"scale": [0.6]}),
        ["spec.data.augment.scale", "at least 2 items"],
    ),
    (
        "augment-scale-over-1",
        spec_set("data.augment", {"scale": [0.6, 1.5]}),
        ["spec.data.augment.scale[1]", "less than or equal to 1"],
    ),
    (
        "augment-policy-section-without-number",
        spec_set("data.augment", {"autoAugment": "augmix-m5-w4-dx"}),
        ["spec.data.augment.autoAugment", "should match"],
    ),
    (
        "mixup-bad-mode",
        spec_set("training.mixup", {"mode": "bach"}),
        ["spec.training.mixup.mode", 'Unsupported value: "bach"'],
    ),
    (
        "early-stopping-patience-zero",
        spec_set("training.earlyStopping", {"patience": 0}),
        ["spec.training.earlyStopping.patience", "greater than or equal to 1"],
    ),
    (
        "batchSize-zero",
        spec_set("training.batchSize", 0),
        ["spec.training.batchSize", "greater than or equal to 1"],
    ),
    (
        "learningRate-zero",
        spec_set("training.learningRate", 0),
        ["spec.training.learningRate", "greater than 0"],
    ),
    (
        "keepLast-one",
        spec_set("checkpoint.keepLast", 1),
        ["spec.checkpoint.keepLast", "greater than or equal to 2"],
    ),
    (
        "bad-toleration-operator",
        spec_set("tolerations", [{"key": "spot", "operator": "In", "value": "x"}]),
        ["spec.tolerations[0].operator", 'Unsupported value: "In"'],
    ),
    (
        "toleration-exists-with-value",
        spec_set("tolerations", [{"key": "spot", "operator": "Exists", "value": "x"}]),
        ["spec.tolerations[0]", "value must be empty when operator is Exists"],
    ),
    (
        "bad-env-name",
        spec_set("podTemplate.env", [{"name": "1-BAD", "value": "x"}]),
        ["spec.podTemplate.env[0].name", "should match"],
    ),
    (
        "duplicate-env-name",
        spec_set("podTemplate.env", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
        ["spec.podTemplate.env[1]", "Duplicate value"],
    ),
    (
        "freeze-unknown-word",
        spec_set("model.freeze", "everything"),
        ["spec.model.freeze", 'Unsupported value: "everything"'],
    ),
    ("freeze-empty-string", spec_set("model.freeze", ""), ["spec.model.freeze", "at least 1 chars long"]),
    (
        "freeze-empty-list",
        spec_set("model.freeze", []),
        ["spec.model.freeze", "must validate at least one schema"],
    ),
    ("freeze-bad-prefix", spec_set("model.freeze", ["bad name"]), ["spec.model.freeze[0]", "should match"]),
    ("freeze-number-item", spec_set("model.freeze", [1]), ["spec.model.freeze[0]", "must be of type string"]),
    (
        "freeze-object",
        spec_set("model.freeze", {"a": 1}),
        ["spec.model.freeze", "must validate at least one schema"],
    ),
    ("freeze-empty-object", spec_set("model.freeze", {}), ["spec.model.freeze", "at least 1 properties"]),
    (
        "freeze-boolean",
        spec_set("model.freeze", True),
        ['"spec.model.freeze" must not validate the schema (not)'],
    ),
    ("freeze-number", spec_set("model.freeze", 5), ["spec.model.freeze", "Unsupported value: 5"]),
    (
        "bad-service-account",
        spec_set("serviceAccountName", "Not_A_Name"),
        ["spec.serviceAccountName", "should match"],
    ),
    (
        "bad-gpu-resource",
        spec_set("resources.gpuResource", "gpu"),
        ["spec.resources.gpuResource", "should match"],
    ),
    (
        "valFraction-too-big",
        spec_set("data.valFraction", 0.95),
        ["spec.data.valFraction", "less than or equal to 0.9"],
    ),
    ("bad-wandb-mode", spec_set("wandb.mode", "on"), ["spec.wandb.mode", 'Unsupported value: "on"']),
    (
        "too-many-wandb-tags",
        spec_set("wandb.tags", [f"t{i}" for i in range(33)]),
        ["spec.wandb.tags", "must have at most 32 items"],
    ),
    ("workers-zero", spec_set("workers", 0), ["spec.workers", "greater than or equal to 1"]),
]


@pytest.mark.parametrize(
    ("edit", "expected"), [(e, x) for _, e, x in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_invalid_manifest_rejected(
    crd: Any, namespace: str, edit: Callable[[dict[str, Any]], None], expected: list[str]
) -> None:
    result = apply(crd, namespace, manifest(edit))
    assert result.returncode != 0, f"accepted:\n{result.stdout}"
    for text in expected:
        assert text in result.stderr
    assert crd.kubectl("get", "ftj", "-n", namespace, "-o", "name").stdout == ""


# --------------------------------------------------------------------------- immutability


@pytest.fixture
def job(crd: Any, namespace: str) -> str:
    result = apply(crd, namespace, manifest())
    assert result.returncode == 0, result.stderr
    return namespace


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"model": {"name": "resnet18"}},
            "spec.model is immutable: changing it would make the checkpoint unusable",
        ),
        ({"model": {"freeze": "backbone"}}, "spec.model is immutable"),
        ({"model": {"freeze": ["stem"]}}, "spec.model is immutable"),
        ({"training": {"learningRate": 0.01}}, "spec.training is immutable"),
        ({"training": {"epochs": 3, "maxSteps": None}}, "spec.training is immutable"),
        ({"data": {"imageSize": 64}}, "spec.data is immutable"),
        ({"workers": 2}, "spec.workers is immutable"),
        ({"resources": {"gpus": 1}}, "spec.resources is immutable"),
        ({"image": "registry.example/kubetune-trainer:2"}, "spec.image is immutable"),
        ({"checkpoint": {"existingClaim": "other"}}, "spec.checkpoint.existingClaim is immutable"),
        ({"checkpoint": {"best": {"metric": "loss"}}}, "spec.checkpoint.best is immutable"),
        ({"evaluation": {"everySteps": 10}}, "spec.evaluation is immutable"),
        (
            {"wandb": {"project": "other"}},
            "spec.wandb.project is immutable: changing it would split the W&B run",
        ),
    ],
    ids=[
        "model",
        "freeze-word",
        "freeze-list",
        "training",
        "training-add-epochs",
        "data",
        "workers",
        "resources",
        "image",
        "claim",
        "best",
        "evaluation",
        "wandb",
    ],
)
def test_resume_critical_fields_are_immutable(crd: Any, job: str, body: dict[str, Any], message: str) -> None:
    before = get_job(crd, job)["spec"]
    result = merge_patch(crd, job, {"spec": body})
    assert result.returncode != 0, result.stdout
    assert message in result.stderr
    assert "create a new FineTuneJob" in result.stderr
    assert get_job(crd, job)["spec"] == before


def test_apply_of_changed_model_is_rejected(crd: Any, job: str) -> None:
    result = apply(crd, job, manifest(spec_set("model.name", "resnet18")))
    assert result.returncode != 0
    assert "spec.model is immutable" in result.stderr


@pytest.mark.parametrize(
    "body",
    [
        {"runPolicy": {"suspend": True}},
        {"runPolicy": {"backoffLimit": 10, "activeDeadlineSeconds": 3600, "maxPreemptions": 5}},
        {"wandb": {"tags": ["a", "b"]}},
        {"checkpoint": {"everySteps": 10, "everySeconds": 60, "keepLast": 5}},
        {"tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]},
    ],
    ids=["suspend", "runPolicy", "wandb-tags", "checkpoint-cadence", "tolerations"],
)
def test_operational_fields_can_change(crd: Any, job: str, body: dict[str, Any]) -> None:
    result = merge_patch(crd, job, {"spec": body})
    assert result.returncode == 0, result.stderr
    spec = get_job(crd, job)["spec"]
    for section, value in body.items():
        if isinstance(value, dict):
            assert value.items() <= spec[section].items()
        else:
            assert spec[section] == value


def test_apply_of_suspend_is_accepted(crd: Any, job: str) -> None:
    result = apply(crd, job, manifest(spec_set("runPolicy.suspend", True)))
    assert result.returncode == 0, result.stderr
    assert get_job(crd, job)["spec"]["runPolicy"]["suspend"] is True


# --------------------------------------------------------------------------- status, columns, explain

STATUS = {
    "phase": "Running",
    "message": "step 90/200, checkpoint at 80",
    "attempt": 3,
    "preemptions": 2,
    "preemptionsByReason": {"PreemptionByScheduler": 2},
    "failures": 1,
    "lostSteps": 17,
    "progress": {
        "step": 90,
        "totalSteps": 200,
        "epoch": 1,
        "percent": 45.5,
        "samplesPerSecond": 12.5,
        "eta": "2m3s",
    },
    "checkpoint": {"step": 80, "path": "/checkpoints/step-00000080", "time": "2026-01-01T00:00:00Z"},
    "lastDisruption": {
        "reason": "PreemptionByScheduler",
        "time": "2026-01-01T00:00:00Z",
        "pod": "job-a2-w0",
        "message": "preempted by a higher-priority pod",
    },
    "metrics": {"loss": 1.25, "accuracy": 0.5, "top5": 0.875},
    "bestMetric": 0.625,
    "bestStep": 60,
    "bestMetricName": "top1",
    "wandb": {"runId": "abc123"},
    "conditions": [
        {
            "type": "Running",
            "status": "True",
            "reason": "PodsRunning",
            "message": "all workers running",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 1,
        }
    ],
    "observedGeneration": 1,
    "startTime": "2026-01-01T00:00:00Z",
}


def test_status_subresource_does_not_change_spec(crd: Any, job: str) -> None:
    before = get_job(crd, job)
    body = {"status": STATUS, "spec": {"model": {"name": "changed-through-status"}}}
    result = merge_patch(crd, job, body, "--subresource=status")
    assert result.returncode == 0, result.stderr
    after = get_job(crd, job)
    assert after["spec"] == before["spec"]
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["status"] == STATUS


def test_status_is_validated(crd: Any, job: str) -> None:
    result = merge_patch(crd, job, {"status": {"phase": "Exploded"}}, "--subresource=status")
    assert result.returncode != 0
    assert "status.phase" in result.stderr


def test_spec_write_does_not_change_status(crd: Any, job: str) -> None:
    assert merge_patch(crd, job, {"status": STATUS}, "--subresource=status").returncode == 0
    result = merge_patch(crd, job, {"status": {"phase": "Failed"}, "spec": {"runPolicy": {"suspend": True}}})
    assert result.returncode == 0, result.stderr
    assert get_job(crd, job)["status"]["phase"] == "Running"


def test_printer_columns(crd: Any, job: str) -> None:
    assert merge_patch(crd, job, {"status": STATUS}, "--subresource=status").returncode == 0
    header, row = crd.kubectl("get", "ftj", "-n", job).stdout.splitlines()
    assert header.split() == [
        "NAME",
        "PHASE",
        "PROGRESS",
        "EPOCH",
        "STEP",
        "CHECKPOINT",
        "BEST",
        "PREEMPTIONS",
        "FAILURES",
        "AGE",
    ]
    assert row.split()[:9] == ["job", "Running", "45", "1", "90", "80", "0.625", "2", "1"]
    header, row = crd.kubectl("get", "ftj", "-n", job, "-o", "wide").stdout.splitlines()
    assert header.split()[-2:] == ["LOST", "AGE"]
    assert row.split()[-2] == "17"


def test_short_name_and_categories(crd: Any, job: str) -> None:
    for resource in ("ftj", "finetunejob", "finetunejobs", "ml", "all"):
        names = crd.kubectl("get", resource, "-n", job, "-o", "name").stdout.split()
        assert "finetunejob.kubetune.io/job" in names, resource


def test_explain_teaches_the_api(crd: Any) -> None:
    def explained() -> str | NotYet:
        result = crd.kubectl("explain", "ftj.spec.training.batchSize", check=False)
        if result.returncode != 0:
            return NotYet(result.stderr.strip())
        return result.stdout

    out = wait_for(explained, timeout=60, interval=1, desc="kubectl explain to know FineTuneJob")
    text = " ".join(out.split())  # kubectl explain wraps descriptions at 80 columns
    assert "Samples per micro-batch per training process. Range: 1 to 65,536. Default: 32." in text
    training = crd.kubectl("explain", "ftj.spec.training").stdout
    for field in ("epochs", "maxSteps", "learningRate", "precision", "Set epochs or maxSteps, not both"):
        assert field in training
