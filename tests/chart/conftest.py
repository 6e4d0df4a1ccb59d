"""Fixtures for the chart tests: our pinned helm (hack/build-binaries.sh), rendering with value sets,
and the FineTuneJob CRD on the cluster. helm runs with its config/cache/data under a temp dir, so the
tests never read or write the user's helm repositories or plugins."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeutil import BIN_DIR, REPO, NotYet, wait_for

CHART = REPO / "charts" / "kubetune"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
HELM = BIN_DIR / "helm"
# `helm template`/`lint` assume Kubernetes v1.20 unless helm was built with its Makefile's
# chartutil.k8sVersion* ldflags (hack/build-binaries.sh does not set them yet): name the version of
# our pinned control plane explicitly. install/upgrade ask the API server instead.
KUBE_VERSION = "v1.34.4"

# Value sets every rendering and server-side dry-run test covers.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"]},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True, "alertLabels": {"team": "ml"}},
        "dashboard": {"annotations": {"grafana_folder": "kubetune"}},
    },
    "ha": {
        "replicaCount": 2,
        "priorityClassName": "kubetune-test-critical",
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}},
            }
        ],
        "imagePullSecrets": [{"name": "regcred"}],
        "operator": {"wandbUrlBase": "https://wandb.ai/acme/ft/runs", "verbose": True},
    },
}


@dataclass
class Helm:
    path: Path
    env: dict[str, str]

    def run(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.path), *args]
        if kubeconfig is not None:
            cmd += ["--kubeconfig", str(kubeconfig)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def template_text(
        self, values: dict[str, Any], release: str = "kt", namespace: str = "kubetune-system", *extra: str
    ) -> str:
        values_file = Path(self.env["HELM_CACHE_HOME"]) / f"values-{os.getpid()}-{id(values)}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        return self.run(
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            "-f",
            str(values_file),
            *extra,
        ).stdout

    def template(
        self, values: dict[str, Any], release: str = "kt", namespace: str = "kubetune-system", *extra: str
    ) -> list[dict[str, Any]]:
        """Rendered objects (CRDs excluded unless --include-crds is in extra)."""
        text = self.template_text(values, release, namespace, *extra)
        return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Helm:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run hack/build-binaries.sh (it builds helm last)", pytrace=False)
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    (home / "cache").mkdir()
    return Helm(HELM, env)


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


@pytest.fixture(scope="session")
def crd(kube: Any) -> None:
    """The FineTuneJob CRD from charts/kubetune/crds/, applied and Established."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    wait_established(kube, "finetunejobs.kubetune.io")


def wait_established(kube: Any, crd_name: str) -> None:
    # Not `kubectl wait`: it errors out while a just-created CRD has no status.conditions yet.
    jsonpath = '{.status.conditions[?(@.type=="Established")].status}'

    def established() -> Any:
        out = kube.kubectl("get", "crd", crd_name, "-o", f"jsonpath={jsonpath}", check=False).stdout
        return out == "True" or NotYet(out)

    wait_for(established, timeout=60, desc=f"CRD {crd_name} Established")


@pytest.fixture(scope="session")
def monitoring_crds(kube: Any) -> None:
    """TEST FIXTURES, not the real Prometheus Operator CRDs (those are not downloadable here): stubs of
    ServiceMonitor, PodMonitor and PrometheusRule whose schemas hold only the fields the chart uses, typed
    as upstream does, so a server-side dry-run with strict field validation catches misspelt fields."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(FIXTURES / "monitoring-crds.yaml"))
    for plural in ("servicemonitors", "podmonitors", "prometheusrules"):
        wait_established(kube, f"{plural}.monitoring.coreos.com")


@pytest.fixture
def extra_namespaces(api_client: Any, namespace: str) -> Iterator[Any]:
    """Factory for more namespaces named after this test's (deleted at the end)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    made: list[str] = []

    def make(suffix: str, labels: dict[str, str] | None = None) -> str:
        # The test's namespace name ends in a random suffix that a cut would lose: add a fresh one.
        name = f"{namespace[: 63 - len(suffix) - 8].rstrip('-')}-{suffix}-{secrets.token_hex(3)}"
        core.create_namespace(
            {"metadata": {"name": name, "labels": {"kubetune.io/test": "true", **(labels or {})}}}
        )
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture
def bound_volume(api_client: Any) -> Iterator[Any]:
    """Factory: a PersistentVolume pre-bound (claimRef) to the claim `namespace/claim`, so a job's
    checkpoint PVC binds whatever state the cluster's shared volume pool or provisioner is in. Nothing is
    mounted on kwok nodes; the PV only lets the pod schedule. Deleted at the end."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    made: list[str] = []

    def make(namespace: str, claim: str) -> str:
        name = f"kubetune-chart-test-{secrets.token_hex(4)}"
        core.create_persistent_volume(
            {
                "metadata": {"name": name, "labels": {"kubetune.io/test": "true"}},
                "spec": {
                    "capacity": {"storage": "1Ti"},
                    "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "standard",
                    "hostPath": {"path": f"/tmp/kubetune-chart-test/{name}", "type": "DirectoryOrCreate"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_persistent_volume(name)
