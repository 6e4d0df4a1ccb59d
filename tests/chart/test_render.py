"""The chart rendered by the real helm (no cluster): lint, what each value set produces, names within 63
characters, the RBAC rules, the monitors matching what the operator builds, and the values schema
rejecting bad values with an error that names the field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import CHART, KUBE_VERSION, VALUE_SETS, Helm, by_kind, one
from kubetune_operator import builders
from kubetune_operator.api import parse_job

pytestmark = pytest.mark.unit

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]

NAMESPACED_RULES = [
    {
        "apiGroups": ["kubetune.io"],
        "resources": ["finetunejobs"],
        "verbs": ["get", "list", "watch", "delete"],
    },
    {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"], "verbs": ["patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list", "watch", "create"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch", "create", "delete"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "create"]},
]
CLUSTER_RULES = [
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    },
]
NAMESPACES_RULE = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}


def values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict(helm: Helm, tmp_path: Path, name: str) -> None:
    out = helm.run(
        "lint",
        "--strict",
        "--kube-version",
        KUBE_VERSION,
        str(CHART),
        "-f",
        str(values_file(tmp_path, VALUE_SETS[name])),
    )
    assert "1 chart(s) linted, 0 chart(s) failed" in out.stdout


def test_every_value_is_documented() -> None:
    """Every value in values.yaml has a `# --` comment block above it, or sits inside a documented map
    (e.g. resources.requests under the documented `resources`); plain groups need no comment."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for n, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block = []
        for prev in reversed(lines[:n]):
            if not prev.strip().startswith("#"):
                break
            block.append(prev.strip())
        documented = any(c.startswith("# --") for c in block) or any(d for _, d in stack)
        is_group = rest == "" and not documented
        if not documented and not is_group:
            undocumented.append(key)
        stack.append((indent, documented))
    assert undocumented == []


def test_default_render(helm: Helm) -> None:
    objs = helm.template({})
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment",
         "ConfigMap", "Pod", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    )  # fmt: skip
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(objs)
    assert c["image"] == f"ghcr.io/kubetune/kubetune-operator:{APP_VERSION}"
    assert c["args"] == [
        "--all-namespaces",
        f"--trainer-image=ghcr.io/kubetune/kubetune-trainer:{APP_VERSION}",
        "--metrics-port=8080",
        "--health-port=8081",
        "--workers=8",
        "--scrape-interval=10",
        "--backoff-base-seconds=10",
        "--backoff-max-seconds=300",
        "--start-timeout-seconds=300",
        "--stuck-terminating-seconds=120",
        "--kueue=off",
        "--leader-name=kt-kubetune",
    ]
    # Every flag the chart passes exists in the operator's CLI and parses.
    from kubetune_operator.cli import parser

    parser().parse_args(c["args"])
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 65532
    assert pod["serviceAccountName"] == one(objs, "ServiceAccount")["metadata"]["name"] == "kt-kubetune"
    assert "priorityClassName" not in pod and "imagePullSecrets" not in pod
    svc = one(objs, "Service")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"] == [
        {"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}
    ]
    test_pod = one(objs, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["image"] == c["image"]
    assert "kt-kubetune.kubetune-system.svc:8080/metrics" in test_pod["spec"]["containers"][0]["args"][0]
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["kubetune.json"]) == json.loads(
        (CHART / "dashboards" / "kubetune.json").read_text()
    )


def test_cluster_wide_rbac_is_exactly_the_operator_calls(helm: Helm) -> None:
    objs = helm.template({})
    assert one(objs, "ClusterRole")["rules"] == CLUSTER_RULES + NAMESPACED_RULES
    lease_role = one(objs, "Role")
    assert lease_role["metadata"]["namespace"] == "kubetune-system"
    assert lease_role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["kt-kubetune"],
         "verbs": ["get", "update"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]  # fmt: skip
    binding = one(objs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "kubetune-system"}
    ]
    verbs = {
        v
        for o in by_kind(objs, "ClusterRole") + by_kind(objs, "Role")
        for r in o["rules"]
        for v in r["verbs"]
    }
    assert not verbs & {"*", "escalate", "bind", "impersonate", "deletecollection"}
    resources = {res for o in by_kind(objs, "ClusterRole") for r in o["rules"] for res in r["resources"]}
    assert "secrets" not in resources


def test_watch_namespaces_gives_roles_per_namespace(helm: Helm) -> None:
    objs = helm.template(VALUE_SETS["namespaced"])
    assert [a for a in container(objs)["args"] if "namespace" in a] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]
    assert one(objs, "ClusterRole")["rules"] == [*CLUSTER_RULES, NAMESPACES_RULE]
    roles = {
        r["metadata"]["namespace"]: r for r in by_kind(objs, "Role") if r["metadata"]["name"] == "kt-kubetune"
    }
    assert sorted(roles) == ["team-a", "team-b"]
    assert all(r["rules"] == NAMESPACED_RULES for r in roles.values())
    bindings = {b["metadata"]["namespace"] for b in by_kind(objs, "RoleBinding")}
    assert bindings == {"team-a", "team-b", "kubetune-system"}


def test_monitoring_objects_select_what_the_operator_builds(helm: Helm) -> None:
    objs = helm.template(VALUE_SETS["monitoring"])
    sm, pm, rule = one(objs, "ServiceMonitor"), one(objs, "PodMonitor"), one(objs, "PrometheusRule")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= one(objs, "Service")["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    # The PodMonitor selects a real trainer pod as builders.trainer_pod makes it, on its named port.
    job = parse_job(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "ft", "namespace": "ml", "uid": "u-1"},
            "spec": {"model": {"name": "test_resnet"}, "data": {"format": "synthetic"}},
        },
        default_image="trainer:1",
    )
    trainer = builders.trainer_pod(job, 1, 0)
    assert pm["spec"]["selector"]["matchLabels"].items() <= trainer["metadata"]["labels"].items()
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] in {p["name"] for p in trainer["spec"]["containers"][0]["ports"]}
    assert endpoint["honorLabels"] is True and pm["spec"]["namespaceSelector"] == {"any": True}
    # Operator pods never match the PodMonitor (no double scrape).
    assert (
        not pm["spec"]["selector"]["matchLabels"].items()
        <= one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"].items()
    )
    alerts = [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert alerts == ["KubetuneJobFailed", "KubetuneRepeatedPreemptions", "KubetuneJobNoProgress",
                      "KubetuneCheckpointTooOld"]  # fmt: skip
    assert all(r["labels"]["team"] == "ml" for g in rule["spec"]["groups"] for r in g["rules"])
    cm = one(objs, "ConfigMap")
    assert cm["metadata"]["annotations"] == {"grafana_folder": "kubetune"}
    namespaced = helm.template({**VALUE_SETS["monitoring"], **VALUE_SETS["namespaced"]})
    assert one(namespaced, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_admission_policy_guards_finetunejobs(helm: Helm) -> None:
    """On by default: Deny, failing closed, on the operator's own GROUP/PLURAL; the lists reach the CEL as
    literals; the image rule only when prefixes are set; the binding follows watchNamespaces.
    tests/chart/test_admission_policy.py runs it on the API server."""
    from kubetune_operator.api import GROUP, PLURAL

    objs = helm.template({})
    vap, binding = one(objs, "ValidatingAdmissionPolicy"), one(objs, "ValidatingAdmissionPolicyBinding")
    assert vap["metadata"]["name"] == binding["spec"]["policyName"] == "kt-kubetune-finetunejobs"
    assert vap["spec"]["failurePolicy"] == "Fail"
    assert vap["spec"]["matchConstraints"]["resourceRules"] == [
        {
            "apiGroups": [GROUP],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": [PLURAL],
        }
    ]
    variables = {v["name"]: v["expression"] for v in vap["spec"]["variables"]}
    assert variables["allowedServiceAccounts"] == '["default"]'
    assert "allowedImagePrefixes" not in variables
    (rule,) = vap["spec"]["validations"]
    assert (
        "spec.serviceAccountName" in rule["message"] and "admission.allowedServiceAccounts" in rule["message"]
    )
    assert binding["spec"]["validationActions"] == ["Deny"] and "matchResources" not in binding["spec"]

    objs = helm.template(
        {
            **VALUE_SETS["namespaced"],
            "trainer": {"image": {"tag": "cu124"}},
            "admission": {
                "allowedServiceAccounts": ["default", "puller"],
                "allowedImagePrefixes": ["r.io/ml/"],
            },
        }
    )
    vap, binding = one(objs, "ValidatingAdmissionPolicy"), one(objs, "ValidatingAdmissionPolicyBinding")
    variables = {v["name"]: v["expression"] for v in vap["spec"]["variables"]}
    assert json.loads(variables["allowedServiceAccounts"]) == ["default", "puller"]
    assert json.loads(variables["allowedImagePrefixes"]) == ["r.io/ml/"]
    assert json.loads(variables["defaultImage"]) == "ghcr.io/kubetune/kubetune-trainer:cu124"
    image_rule = vap["spec"]["validations"][1]
    assert "spec.image" in image_rule["message"] and "admission.allowedImagePrefixes" in image_rule["message"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team-a", "team-b"]}
    ]

    off = helm.template({"admission": {"enabled": False}})
    assert not [o for o in off if o["kind"].startswith("ValidatingAdmissionPolicy")]


def test_admission_policy_needs_kubernetes_1_30(helm: Helm, tmp_path: Path) -> None:
    """Before 1.30 the chart refuses to install without the policy rather than silently dropping it."""
    old = ("template", "kt", str(CHART), "--kube-version", "v1.29.3")
    out = helm.run(*old, check=False)
    assert out.returncode != 0 and "admission.enabled needs Kubernetes 1.30+" in out.stderr, out.stderr
    off = values_file(tmp_path, {"admission": {"enabled": False}})
    assert helm.run(*old, "-f", str(off)).returncode == 0


def test_ha_and_options(helm: Helm) -> None:
    objs = helm.template(VALUE_SETS["ha"])
    dep = one(objs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 2
    assert pod["priorityClassName"] == "kubetune-test-critical"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    args = container(objs)["args"]
    assert "--wandb-url-base=https://wandb.ai/acme/ft/runs" in args and "--verbose" in args
    assert "--leader-name=kt-kubetune" in args


def test_leader_election_off_needs_one_replica(helm: Helm, tmp_path: Path) -> None:
    objs = helm.template({"leaderElection": {"enabled": False}})
    assert "--no-leader-election" in container(objs)["args"]
    assert not [r for r in by_kind(objs, "Role") if "leases" in r["rules"][0]["resources"]]
    bad = values_file(tmp_path, {"leaderElection": {"enabled": False}, "replicaCount": 2})
    out = helm.run("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(bad), check=False)
    assert out.returncode != 0 and "needs replicaCount 1" in out.stderr


def test_image_digest_and_tags(helm: Helm) -> None:
    digest = "sha256:" + "a" * 64
    objs = helm.template({"image": {"digest": digest}, "trainer": {"image": {"tag": "cu124"}}})
    c = container(objs)
    assert c["image"] == f"ghcr.io/kubetune/kubetune-operator@{digest}"
    assert "--trainer-image=ghcr.io/kubetune/kubetune-trainer:cu124" in c["args"]
    pinned = container(helm.template({"trainer": {"image": {"tag": "cu124", "digest": digest}}}))
    assert f"--trainer-image=ghcr.io/kubetune/kubetune-trainer@{digest}" in pinned["args"]  # digest wins


def test_names_and_labels_fit_63(helm: Helm) -> None:
    release = "r" * 53  # helm's own limit on release names
    objs = helm.template({"nameOverride": "n" * 63}, release, "ns", "--include-crds")
    for o in objs:
        name = o["metadata"]["name"]
        assert len(name) <= 63 and DNS1123.match(name.replace(".", "-")), name
        for key, value in (o["metadata"].get("labels") or {}).items():
            assert len(value) <= 63 and LABEL_VALUE.match(value), (o["kind"], key, value)
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "truncation made two objects of a kind collide"
    suffixed = [n for k, n in names if n.endswith(("-leader", "-test", "-dashboard"))]
    assert len(set(suffixed)) == 3, names  # leader (Role + RoleBinding), test, dashboard


BAD_VALUES = [
    ("typo key", {"replicaCont": 2}, ["replicaCont"]),
    ("nested typo", {"serviceMonitor": {"enabeld": True}}, ["serviceMonitor", "enabeld"]),
    ("wrong type", {"replicaCount": "two"}, ["replicaCount"]),
    ("negative replicas", {"replicaCount": -1}, ["replicaCount", "minimum"]),
    ("list expected", {"watchNamespaces": "team-a"}, ["watchNamespaces"]),
    ("bad namespace name", {"watchNamespaces": ["Team_A"]}, ["watchNamespaces"]),
    ("enum", {"image": {"pullPolicy": "Sometimes"}}, ["pullPolicy"]),
    ("trainer digest", {"trainer": {"image": {"digest": "latest"}}}, ["trainer", "digest"]),
    ("port range", {"metrics": {"port": 70000}}, ["metrics", "port"]),
    ("duration", {"prometheusRule": {"preemptionsWindow": "1 hour"}}, ["preemptionsWindow"]),
    ("bool type", {"dashboard": {"enabled": "yes"}}, ["dashboard", "enabled"]),
    ("zero workers", {"operator": {"workers": 0}}, ["workers"]),
    ("admission typo", {"admission": {"allowedImagePrefix": []}}, ["allowedImagePrefix"]),
    ("admission bool", {"admission": {"enabled": "yes"}}, ["admission", "enabled"]),
    ("SA list expected", {"admission": {"allowedServiceAccounts": "default"}}, ["allowedServiceAccounts"]),
    ("SA list empty", {"admission": {"allowedServiceAccounts": []}}, ["allowedServiceAccounts"]),
    ("SA name", {"admission": {"allowedServiceAccounts": ["Builder_SA"]}}, ["allowedServiceAccounts"]),
    ("SA item type", {"admission": {"allowedServiceAccounts": [7]}}, ["allowedServiceAccounts"]),
    ("prefix list expected", {"admission": {"allowedImagePrefixes": "ghcr.io/"}}, ["allowedImagePrefixes"]),
    (
        "prefix item type",
        {"admission": {"allowedImagePrefixes": [{"ghcr.io": "/"}]}},
        ["allowedImagePrefixes"],
    ),
    # Without a trailing /, : or @ the prefix would also admit registry.example.com.evil.io/...
    (
        "open prefix",
        {"admission": {"allowedImagePrefixes": ["registry.example.com"]}},
        ["allowedImagePrefixes"],
    ),
    # A bare "name:" would also admit the registry name:5000/...: a prefix starts with a registry host and /.
    (
        "registry-less tag prefix",
        {"admission": {"allowedImagePrefixes": ["ubuntu:"]}},
        ["allowedImagePrefixes"],
    ),
    (
        "prefix quote",
        {"admission": {"allowedImagePrefixes": ["a/' || true || '/"]}},
        ["allowedImagePrefixes"],
    ),
]


@pytest.mark.parametrize(("why", "values", "names"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_schema_rejects(
    helm: Helm, tmp_path: Path, why: str, values: dict[str, Any], names: list[str]
) -> None:
    out = helm.run(
        "template",
        "kt",
        str(CHART),
        "--kube-version",
        KUBE_VERSION,
        "-f",
        str(values_file(tmp_path, values)),
        check=False,
    )
    assert out.returncode != 0, f"{why}: accepted"
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    for name in names:
        assert name in out.stderr, f"{why}: error does not name {name!r}:\n{out.stderr}"


def test_dashboard_json_is_generated() -> None:
    gen = Path(CHART).parents[1] / "hack" / "dashboard" / "generate.py"
    out = subprocess.run([sys.executable, str(gen), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    board = json.loads((CHART / "dashboards" / "kubetune.json").read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    titles = {p["title"] for p in panels}
    for want in ("FineTuneJobs by phase", "Progress", "ETA", "Loss", "Eval accuracy (top-1)", "Throughput",
                 "Checkpoint age", "Checkpoint save duration", "Preemptions by reason", "Lost steps",
                 "Recovery time", "GPU utilisation", "GPU framebuffer used"):  # fmt: skip
        assert want in titles
    # Panels never overlap on the 24-column grid.
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


@pytest.mark.parametrize(
    "path", sorted((CHART.parents[1] / "examples").glob("helm-values-*.yaml")), ids=lambda p: p.name
)
def test_example_values_files_render(helm: Helm, path: Path) -> None:
    objs = helm.template(yaml.safe_load(path.read_text()))
    assert one(objs, "Deployment")["spec"]["replicas"] >= 1


KUEUE_NAMESPACED = [
    {
        "apiGroups": ["kueue.x-k8s.io"],
        "resources": ["workloads"],
        "verbs": ["get", "list", "watch", "create", "patch"],
    },
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads/status"], "verbs": ["patch"]},
]
KUEUE_CLUSTER = [
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloadpriorityclasses"], "verbs": ["get"]},
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["resourceflavors"], "verbs": ["get", "list", "watch"]},
]  # fmt: skip


def test_kueue_adds_only_the_workload_calls(helm: Helm, tmp_path: Path) -> None:
    """kueue.enabled adds exactly what kueue_client.py calls: Workloads get (a lagging watch), list and
    watch (its informer), create, patch (spec.active: runPolicy.suspend); workloads/status patch (eviction hand-back, PodsReady, Finished); a GET
    of a WorkloadPriorityClass; ResourceFlavors get (before the watch synced), list and watch. Off (the default): no Kueue rule, --kueue=off."""
    off = helm.template({})
    assert "--kueue=off" in container(off)["args"]
    assert not [
        r for o in by_kind(off, "ClusterRole") for r in o["rules"] if "kueue.x-k8s.io" in r["apiGroups"]
    ]
    on = helm.template({"kueue": {"enabled": True}})
    assert "--kueue=auto" in container(on)["args"]
    assert one(on, "ClusterRole")["rules"] == (
        CLUSTER_RULES[:2] + KUEUE_CLUSTER + CLUSTER_RULES[2:] + NAMESPACED_RULES + KUEUE_NAMESPACED
    )
    namespaced = helm.template({"kueue": {"enabled": True}, **VALUE_SETS["namespaced"]})
    roles = [r for r in by_kind(namespaced, "Role") if r["metadata"]["name"] == "kt-kubetune"]
    assert roles and all(r["rules"] == NAMESPACED_RULES + KUEUE_NAMESPACED for r in roles)
    bad = values_file(tmp_path, {"kueue": {"enabled": "yes"}})
    out = helm.run("template", "kt", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(bad), check=False)
    assert out.returncode != 0 and "/kueue/enabled" in out.stderr
