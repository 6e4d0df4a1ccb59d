"""Pure checks of the FineTuneJob CRD YAML: names, descriptions, bounds, defaults, examples.

The API server proves the schema works (tests/cluster/test_crd_validation.py); these tests keep it
teachable (`kubectl explain`) and bounded (CEL cost, no unbounded strings) without a cluster.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "charts/kubetune/crds/finetunejobs.kubetune.io.yaml"
GENERATOR = ROOT / "hack/crd/gen_crd.py"
EXAMPLES = sorted((ROOT / "examples").glob("finetunejob-*.yaml"))

# The trainer's defaults, written down here as the contract; compared with kubetune_trainer.config below
# when that module is importable. Keys are spec paths.
EXPECTED_DEFAULTS: dict[str, Any] = {
    "model.pretrained": False,
    "model.freeze": "none",
    "data.format": "imagefolder",
    "data.valFraction": 0.1,
    "data.numWorkers": 2,
    "data.syntheticSamples": 256,
    "training.batchSize": 32,
    "training.learningRate": 0.001,
    "training.weightDecay": 0.05,
    "training.optimizer": "adamw",
    "training.scheduler": "cosine",
    "training.warmupSteps": 0,
    "training.gradAccumulation": 1,
    "training.precision": "auto",
    "training.seed": 0,
    "training.labelSmoothing": 0.0,
    "training.gradClip": 0.0,
    "training.ema": False,
    "checkpoint.everySteps": 100,
    "checkpoint.everySeconds": 0,
    "checkpoint.keepLast": 2,
    "checkpoint.storage.size": "10Gi",
    "checkpoint.retainOnDelete": False,
    "wandb.mode": "disabled",
    "wandb.apiKeySecretRef.key": "api-key",
    "metrics.port": 9400,
    "workers": 1,
    "resources.gpus": 1,
    "resources.gpuResource": "nvidia.com/gpu",
    "terminationGracePeriodSeconds": 60,
    "automountServiceAccountToken": False,
    "runPolicy.backoffLimit": 3,
    "runPolicy.suspend": False,
}
# Optional fields without a default: the trainer treats them as None.
EXPECTED_UNSET = [
    "model.weights",
    "model.numClasses",
    "data.imageSize",
    "training.epochs",
    "training.maxSteps",
    "training.deterministic",
    "runPolicy.maxPreemptions",
    "runPolicy.activeDeadlineSeconds",
    "runPolicy.ttlSecondsAfterFinished",
]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return only


@pytest.fixture(scope="module")
def schema(version: dict[str, Any]) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its dotted path; list items are `path[]`, map values `path{}`."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def node_at(schema: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = schema["properties"]["spec"]
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def test_names_and_version(crd: dict[str, Any], version: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.io"
    assert spec["group"] == "kubetune.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "FineTuneJob",
        "listKind": "FineTuneJobList",
        "plural": "finetunejobs",
        "singular": "finetunejob",
        "shortNames": ["ftj"],
        "categories": ["all", "ml"],
    }
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_every_node_has_a_description(schema: dict[str, Any]) -> None:
    missing = [p for p, node in walk(schema) if p != "metadata" and not node.get("description", "").strip()]
    assert missing == []


def test_every_number_is_bounded(schema: dict[str, Any]) -> None:
    unbounded = [
        p
        for p, node in walk(schema)
        if node.get("type") in ("integer", "number") and ("minimum" not in node or "maximum" not in node)
    ]
    assert unbounded == []


def test_every_string_is_bounded(schema: dict[str, Any]) -> None:
    unbounded = [
        p
        for p, node in walk(schema)
        if node.get("type") == "string" and not ({"maxLength", "enum", "pattern", "format"} & node.keys())
    ]
    assert unbounded == []


def test_every_list_and_map_is_bounded(schema: dict[str, Any]) -> None:
    lists = [p for p, node in walk(schema) if node.get("type") == "array" and "maxItems" not in node]
    maps = [p for p, node in walk(schema) if "additionalProperties" in node and "maxProperties" not in node]
    assert lists == [] and maps == []


def test_spec_rejects_unknown_fields(schema: dict[str, Any]) -> None:
    """Free-form nodes are the exception, never the rule: the core Affinity (copied verbatim to the pods)
    and model.freeze, a string-or-list union that anyOf constrains (a structural schema has no unions)."""
    spec = schema["properties"]["spec"]
    free = [p for p, node in walk(spec, "spec") if node.get("x-kubernetes-preserve-unknown-fields")]
    assert free == ["spec.model.freeze", "spec.affinity"]
    freeze = spec["properties"]["model"]["properties"]["freeze"]
    assert freeze["anyOf"][0] == {"enum": ["none", "backbone"]}
    assert freeze["items"]["type"] == "string"
    objects_without_props = [
        p
        for p, node in walk(spec, "spec")
        if node.get("type") == "object"
        and "properties" not in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ]
    assert objects_without_props == []


@pytest.mark.parametrize(("path", "default"), sorted(EXPECTED_DEFAULTS.items()))
def test_schema_defaults(schema: dict[str, Any], path: str, default: Any) -> None:
    node = node_at(schema, path)
    assert node.get("default") == default
    assert type(node.get("default")) is type(default) or node["type"] == "number"


@pytest.mark.parametrize("path", EXPECTED_UNSET)
def test_optional_fields_have_no_default(schema: dict[str, Any], path: str) -> None:
    assert "default" not in node_at(schema, path)


def test_defaults_within_bounds(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        if "default" not in node or node.get("type") not in ("integer", "number"):
            continue
        assert node["minimum"] <= node["default"] <= node["maximum"], path
        if "enum" in node:
            assert node["default"] in node["enum"], path


def test_sections_default_to_empty_objects(schema: dict[str, Any]) -> None:
    """So the stored object shows every default and transition rules always see old and new values."""
    spec = schema["properties"]["spec"]["properties"]
    for section in (
        "data",
        "training",
        "checkpoint",
        "wandb",
        "metrics",
        "tensorboard",
        "resources",
        "runPolicy",
    ):
        assert spec[section].get("default") == {}, section


@pytest.fixture(scope="module")
def trainer_config() -> Any:
    return pytest.importorskip("kubetune_trainer.config", reason="trainer config module not importable")


def test_crd_has_every_trainer_field(schema: dict[str, Any], trainer_config: Any) -> None:
    spec = schema["properties"]["spec"]["properties"]
    missing = [
        f"{section}.{name}"
        for section, names in trainer_config.TRAINER_FIELDS.items()
        for name in names
        if name not in spec[section]["properties"]
    ]
    assert missing == []


def test_trainer_accepts_every_crd_field(schema: dict[str, Any], trainer_config: Any) -> None:
    """The trainer rejects unknown fields, so a manifest the API server accepts must parse in the trainer."""
    spec = schema["properties"]["spec"]["properties"]
    top_unknown = set(spec) - set(trainer_config.TRAINER_FIELDS) - set(trainer_config.OPERATOR_ONLY_TOP)
    assert top_unknown == set()
    unknown = [
        f"{section}.{name}"
        for section, fields in trainer_config.TRAINER_FIELDS.items()
        for name in spec[section]["properties"]
        if name not in fields and name not in trainer_config.OPERATOR_ONLY_FIELDS.get(section, ())
    ]
    assert unknown == []


def test_trainer_config_defaults_match(schema: dict[str, Any], trainer_config: Any) -> None:
    """A field the trainer defaults has the same schema default; a field the trainer leaves None has none."""
    spec = schema["properties"]["spec"]["properties"]
    mismatched = {}
    for section, defaults in trainer_config.field_defaults().items():
        for name, want in defaults.items():
            if want in (None, []):  # None / empty tuple: optional, the schema must not invent a value
                want = None
            got = spec[section]["properties"][name].get("default")
            if got != want or (type(got) is not type(want) and not isinstance(got, float)):
                mismatched[f"{section}.{name}"] = (got, want)
    assert mismatched == {}


def test_contract_table_matches_trainer(trainer_config: Any) -> None:
    defaults = trainer_config.field_defaults()
    for path, want in EXPECTED_DEFAULTS.items():
        section, _, name = path.partition(".")
        if name in defaults.get(section, {}):
            assert defaults[section][name] == want, path
    for path in EXPECTED_UNSET:
        section, _, name = path.partition(".")
        if name in defaults.get(section, {}):
            assert defaults[section][name] is None, path


def test_printer_columns_use_plain_status_fields(version: dict[str, Any], schema: dict[str, Any]) -> None:
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == [
        "Phase",
        "Progress",
        "Epoch",
        "Step",
        "Checkpoint",
        "Best",
        "Preemptions",
        "Failures",
        "Lost",
        "Age",
    ]
    assert columns["Lost"]["priority"] == 1
    for column in columns.values():
        path = column["jsonPath"]
        assert "[" not in path, f"{column['name']} must not index into a list (stale conditions)"
        if path.startswith(".status."):
            node = schema
            for part in path.split(".")[1:]:
                node = node["properties"][part]
            assert node["type"] in ("string", "integer", "number")


def test_conditions_are_a_map_keyed_by_type(schema: dict[str, Any]) -> None:
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_generator_is_in_sync() -> None:
    if not GENERATOR.exists():
        pytest.skip("no generator")
    result = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def unknown_keys(value: Any, node: dict[str, Any], path: str) -> Iterator[str]:
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict) and "properties" in node:
        for key, child in value.items():
            if key not in node["properties"]:
                yield f"{path}.{key}"
            else:
                yield from unknown_keys(child, node["properties"][key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            yield from unknown_keys(item, node["items"], f"{path}[{i}]")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_use_only_known_fields(schema: dict[str, Any], example: Path) -> None:
    manifest = yaml.safe_load(example.read_text())
    assert manifest["apiVersion"] == "kubetune.io/v1alpha1"
    assert manifest["kind"] == "FineTuneJob"
    assert list(unknown_keys(manifest["spec"], schema["properties"]["spec"], "spec")) == []


def test_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "finetunejob-minimal.yaml",
        "finetunejob-spot-gpu.yaml",
        "finetunejob-ddp.yaml",
    }


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_parse_in_the_trainer(trainer_config: Any, example: Path) -> None:
    """A manifest the API server accepts runs in the trainer unchanged."""
    job = trainer_config.load_job(example, env={})
    assert job.name == yaml.safe_load(example.read_text())["metadata"]["name"]


def rules(schema: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {
        p: node["x-kubernetes-validations"] for p, node in walk(schema) if "x-kubernetes-validations" in node
    }


def test_every_cel_rule_has_a_message(schema: dict[str, Any]) -> None:
    assert [(p, r["rule"]) for p, rs in rules(schema).items() for r in rs if not r.get("message")] == []


def test_resume_critical_sections_are_immutable(schema: dict[str, Any]) -> None:
    by_path = {p: [r["rule"] for r in rs] for p, rs in rules(schema).items()}
    for path in (
        "spec.model",
        "spec.data",
        "spec.training",
        "spec.resources",
        "spec.workers",
        "spec.wandb.mode",
    ):
        assert "self == oldSelf" in by_path[path], path
    transition = [r for rs in by_path.values() for r in rs if "oldSelf" in r]
    mutable = ("runPolicy", "tags", "everySteps", "everySeconds", "keepLast", "tolerations", "nodeSelector")
    assert not [r for r in transition if any(m in r for m in mutable)]
    for path in (
        "spec.runPolicy",
        "spec.checkpoint.everySteps",
        "spec.checkpoint.keepLast",
        "spec.wandb.tags",
    ):
        assert not any("oldSelf" in r for r in by_path.get(path, [])), path


def _crd_node(spec: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The CRD schema of a trainer field path (data.augment.scale); number lists give their item schema."""
    node: dict[str, Any] = {"properties": spec}
    for part in dotted.split("."):
        node = node["properties"][part]
    return node


def test_trainer_bounds_and_choices_match_the_field_table(
    schema: dict[str, Any], trainer_config: Any
) -> None:
    """The API server and the trainer accept the same values: the CRD's bounds and enums are the table's,
    nested objects (data.augment, training.mixup, ...) and number lists (their items) included."""
    spec = schema["properties"]["spec"]["properties"]
    drift = {}
    checked = 0
    for dotted, _f, fs in trainer_config.all_field_specs():
        if dotted == "model.freeze":
            continue  # a union, checked by its own tests
        crd = _crd_node(spec, dotted)
        if fs.nested is not None:
            assert crd["type"] == "object" and "default" not in crd, dotted  # absent means off
            continue
        if fs.items:
            assert (crd.get("minItems"), crd.get("maxItems")) == (fs.items, fs.items), dotted
            crd = crd["items"]
        checked += 1
        if fs.choices and crd.get("enum") != list(fs.choices):
            drift[dotted] = ("enum", crd.get("enum"), fs.choices)
        integer = crd.get("type") == "integer"
        low = fs.ge if fs.ge is not None else fs.gt
        high = fs.le if fs.le is not None else fs.lt
        if integer and fs.gt is not None:
            low = fs.gt + 1
        if integer and fs.lt is not None:
            high = fs.lt - 1
        got = (crd.get("minimum"), crd.get("maximum"))
        if low is not None and got != (low, high):
            drift[dotted] = ("range", got, (low, high))
        if not integer and crd.get("type") == "number":
            open_ends = (crd.get("exclusiveMinimum", False), crd.get("exclusiveMaximum", False))
            if open_ends != (fs.gt is not None, fs.lt is not None):
                drift[dotted] = ("exclusive", open_ends)
    assert drift == {}
    assert checked > 60  # the nested fields were walked, not skipped


def test_run_defining_fields_are_immutable_in_the_crd(schema: dict[str, Any], trainer_config: Any) -> None:
    """A field the trainer refuses to change on resume must not be editable on a running FineTuneJob."""
    spec = schema["properties"]["spec"]["properties"]
    editable = []
    for dotted in trainer_config.RESUME_CRITICAL:
        section, name = dotted.split(".")[:2]
        rules = [r["rule"] for r in spec[section].get("x-kubernetes-validations", [])]
        # An optional object of a mutable section (checkpoint.best) is guarded on the section: adding,
        # removing or changing it is refused.
        optional = (
            f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})"
        )
        if "self == oldSelf" not in rules and optional not in rules:
            editable.append(dotted)
    assert editable == []
