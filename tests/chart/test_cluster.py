"""The chart against the real local control plane (kube-apiserver + controllers + scheduler + kwok).

What this proves and what it does not: kwok nodes fake the kubelet, so the operator pod the chart
deploys is admitted, scheduled and reported Running, but no container runs (the operator itself is run as
a process in test_rbac.py and test_prometheus.py). The helm test pod is likewise never executed: the
test plays the kubelet's part and reports it Succeeded, which proves the hook's admission, scheduling and
helm's handling of it. The check inside it is run against a real operator in test_prometheus.py (as a
local process; running it from the image needs the real-node issue, with the image built).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from conftest import CHART, VALUE_SETS, Helm
from kubetune_operator import builders
from kubetune_operator.api import parse_job
from kubeutil import NotYet, patch_pod_terminated, wait_for

pytestmark = pytest.mark.cluster

# kwok never pulls images; a name that cannot resolve makes sure nothing ever tries to.
TEST_VALUES = {"image": {"repository": "registry.invalid/kubetune/operator"}}
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
# Every kind the chart creates, namespaced and cluster-scoped (for the orphan check).
NAMESPACED_KINDS = (
    "deployments.apps,replicasets.apps,pods,services,serviceaccounts,configmaps,"
    "roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,"
    "servicemonitors.monitoring.coreos.com,podmonitors.monitoring.coreos.com,"
    "prometheusrules.monitoring.coreos.com"
)
CLUSTER_KINDS = (
    "clusterroles.rbac.authorization.k8s.io,clusterrolebindings.rbac.authorization.k8s.io,"
    "validatingadmissionpolicies.admissionregistration.k8s.io,"
    "validatingadmissionpolicybindings.admissionregistration.k8s.io"
)


def release_name() -> str:
    # Cluster-scoped objects (ClusterRole...) are named after the release: unique per test.
    return f"kt{secrets.token_hex(3)}"


def merged(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture
def priority_class(api_client: Any) -> Any:
    sched = client.SchedulingV1Api(api_client)
    body = {
        "metadata": {"name": "kubetune-test-critical"},
        "value": 1000000,
        "description": "kubetune chart tests",
    }
    try:
        sched.create_priority_class(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    return body["metadata"]["name"]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_server_side_dry_run(
    kube: Any, helm: Helm, crd: None, monitoring_crds: None, priority_class: str, namespace: str,
    extra_namespaces: Any, name: str,
) -> None:  # fmt: skip
    """Every object of each value set passes the real API server's validation and admission
    (strict field validation: an unknown field is an error), as `kubectl apply --dry-run=server`."""
    values = merged(TEST_VALUES, VALUE_SETS[name])
    if values.get("watchNamespaces"):
        values["watchNamespaces"] = [extra_namespaces("team-a"), extra_namespaces("team-b")]
    manifest = helm.template_text(values, release_name(), namespace)
    out = kube.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest)
    applied = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(applied) == len([d for d in yaml.safe_load_all(manifest) if d]), out.stdout
    assert all("(server dry run)" in ln for ln in applied), out.stdout
    assert "Warning" not in out.stderr, out.stderr


def test_restricted_pod_security_admits_operator_and_trainer_pods(
    kube: Any, helm: Helm, crd: None, namespace: str, core_v1: Any, tmp_path: Path
) -> None:
    """In a namespace enforcing the "restricted" Pod Security Standard, the real API server admits the
    chart's operator pod and helm test pod and a trainer pod from the operator's own builder."""
    kube.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    objs = [d for d in yaml.safe_load_all(helm.template_text(TEST_VALUES, "kt", namespace)) if d]
    kube.kubectl("apply", "-f", "-", input=json.dumps(next(o for o in objs if o["kind"] == "ServiceAccount")))
    dep = next(o for o in objs if o["kind"] == "Deployment")
    operator_pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "operator-admission",
            "namespace": namespace,
            **dep["spec"]["template"]["metadata"],
        },
        "spec": dep["spec"]["template"]["spec"],
    }
    test_pod = next(o for o in objs if o["kind"] == "Pod")
    job = parse_job(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "ft", "namespace": namespace, "uid": "00000000-0000-0000-0000-000000000001"},
            "spec": {
                "model": {"name": "test_resnet", "numClasses": 10},
                "data": {"format": "synthetic"},
                "resources": {"gpus": 1},
                "workers": 2,
                "tolerations": [
                    {"key": "cloud.google.com/gke-spot", "operator": "Exists", "effect": "NoSchedule"}
                ],
            },
        },
        default_image="registry.invalid/kubetune/trainer:test",
    )
    trainer = builders.trainer_pod(job, 1, 0)
    # A pod that breaks the profile is refused: the namespace really enforces it.
    privileged = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "x", "securityContext": {"privileged": True}}]},
    }
    bad = kube.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(privileged), check=False)
    assert bad.returncode != 0 and "violates PodSecurity" in bad.stderr, bad.stderr
    for pod in (operator_pod, test_pod, trainer):
        out = kube.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(pod), check=False
        )
        assert out.returncode == 0, f"{pod['metadata']['name']}: {out.stderr}"
        assert "Warning" not in out.stderr, out.stderr


def leftovers(kube: Any, release: str, namespaces: list[str]) -> list[str]:
    sel = f"app.kubernetes.io/instance={release}"
    found = []
    for ns in namespaces:
        out = kube.kubectl("get", NAMESPACED_KINDS, "-n", ns, "-l", sel, "-o", "name")
        found += [f"{ns}/{line}" for line in out.stdout.split()]
    found += kube.kubectl("get", CLUSTER_KINDS, "-l", sel, "-o", "name").stdout.split()
    return found


def test_install_test_upgrade_uninstall(
    kube: Any, helm: Helm, crd: None, monitoring_crds: None, namespace: str, extra_namespaces: Any,
    core_v1: Any, api_client: Any, tmp_path: Path,
) -> None:  # fmt: skip
    release = release_name()
    kube.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    team = extra_namespaces("team", RESTRICTED)
    base = merged(TEST_VALUES, {"watchNamespaces": [team]})

    # install: every object created; the ReplicaSet's pod admitted under "restricted" and scheduled.
    out = helm.run(
        "install", release, str(CHART), "-n", namespace, "-f", str(values_file(tmp_path, base)),
        "--wait", "--timeout", "120s", kubeconfig=kube.kubeconfig,
    )  # fmt: skip
    assert "kubectl apply -n " + team in out.stdout  # NOTES: how to submit a first job
    assert f"{release}-kubetune.{namespace}.svc:8080/metrics" in out.stdout
    pods = core_v1.list_namespaced_pod(
        namespace, label_selector=f"app.kubernetes.io/instance={release}"
    ).items
    assert [p.status.phase for p in pods] == ["Running"], "operator pod admitted and (kwok-)running"
    assert pods[0].spec.node_name.startswith("kwok-")
    assert kube.kubectl("get", "crd", "finetunejobs.kubetune.io").returncode == 0

    # helm test: the hook pod is created (admitted under "restricted", scheduled); kwok does not run it,
    # so we report its container's exit 0 as the kubelet would, and helm reports the test passed.
    test_name = f"{release}-kubetune-test"
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    runner = threading.Thread(
        target=lambda: result.update(
            test=helm.run(
                "test", release, "-n", namespace, "--timeout", "90s", kubeconfig=kube.kubeconfig, check=False
            )
        )
    )
    runner.start()

    def scheduled() -> Any:
        try:
            pod = core_v1.read_namespaced_pod(test_name, namespace)
        except ApiException as exc:
            return NotYet(exc.status)
        return pod if pod.status.phase == "Running" else NotYet(pod.status.phase)

    pod = wait_for(scheduled, timeout=60, desc="helm test pod Running")
    assert pod.spec.automount_service_account_token is False
    patch_pod_terminated(core_v1, namespace, test_name, 0, "Completed")
    runner.join(timeout=120)
    assert result["test"].returncode == 0, result["test"].stderr + result["test"].stdout
    assert "Phase:          Succeeded" in result["test"].stdout

    # upgrade: HA + monitoring objects appear; a second upgrade without them removes them again.
    more = merged(base, VALUE_SETS["monitoring"], {"replicaCount": 2})
    helm.run(
        "upgrade", release, str(CHART), "-n", namespace, "-f", str(values_file(tmp_path, more, "more.yaml")),
        "--wait", "--timeout", "120s", kubeconfig=kube.kubeconfig,
    )  # fmt: skip
    dep = client.AppsV1Api(api_client).read_namespaced_deployment(f"{release}-kubetune", namespace)
    assert dep.spec.replicas == 2 and dep.status.ready_replicas == 2
    for kind in ("servicemonitor", "podmonitor", "prometheusrule"):
        assert kube.kubectl(
            "get", kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
        ).stdout
    helm.run(
        "upgrade", release, str(CHART), "-n", namespace, "-f", str(values_file(tmp_path, base)),
        "--wait", "--timeout", "120s", kubeconfig=kube.kubeconfig,
    )  # fmt: skip
    for kind in ("servicemonitor", "podmonitor", "prometheusrule"):
        assert not kube.kubectl(
            "get", kind, "-n", namespace, "-l", f"app.kubernetes.io/instance={release}", "-o", "name"
        ).stdout

    # uninstall: nothing of the release is left, in any namespace or cluster-wide; the CRD stays.
    assert leftovers(kube, release, [namespace, team])
    helm.run("uninstall", release, "-n", namespace, "--wait", "--timeout", "120s", kubeconfig=kube.kubeconfig)
    wait_for(lambda: not leftovers(kube, release, [namespace, team]) or NotYet(leftovers(kube, release, [namespace, team])),
             timeout=60, desc="no objects of the release left")  # fmt: skip
    assert kube.kubectl("get", "crd", "finetunejobs.kubetune.io").returncode == 0
