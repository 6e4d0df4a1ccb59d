"""Fixtures for operator tests on the real control plane: the CRD installed from the chart, and the
operator itself run as real processes (`python -m kubetune_operator`) against the cluster."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeutil import NotYet, wait_for
from opkit import CRD_DIR, OperatorProcess


@pytest.fixture(scope="session")
def crd(kube: Any) -> None:
    """The FineTuneJob CRD from charts/kubetune/crds/, applied and Established."""
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))

    # `kubectl wait --for=condition=Established` errors out while the new CRD has no conditions yet.
    def established() -> bool:
        out = kube.kubectl(
            "get", "crd", "finetunejobs.kubetune.io", "-o",
            'jsonpath={.status.conditions[?(@.type=="Established")].status}', check=False,
        ).stdout  # fmt: skip
        return out.strip() == "True"

    wait_for(established, timeout=60, desc="CRD finetunejobs.kubetune.io Established")


@pytest.fixture
def custom(api_client: Any) -> Any:
    """The CustomObjectsApi the FineTuneJob tests read and patch jobs with."""
    from kubernetes import client

    return client.CustomObjectsApi(api_client)


@pytest.fixture
def start_operator(
    kube: Any, crd: None, namespace: str, tmp_path: Path
) -> Iterator[Callable[..., OperatorProcess]]:
    """Start operator replicas for this test's namespace; every one is stopped (by PID) at the end."""
    started: list[OperatorProcess] = []

    def start(*extra: str) -> OperatorProcess:
        op = OperatorProcess(kube.kubeconfig, namespace, tmp_path / f"operator-{len(started)}.log", *extra)
        started.append(op)
        return op.start()

    yield start
    for op in started:
        op.stop()


@pytest.fixture
def operator(start_operator: Callable[..., OperatorProcess]) -> OperatorProcess:
    return start_operator()


@pytest.fixture
def claim_with_volume(core_v1: Any) -> Iterator[Callable[..., str]]:
    """Factory: a PersistentVolumeClaim `claim` in `namespace` bound to its own PersistentVolume (pre-bound
    by claimRef, so any access mode binds whatever the cluster's provisioner supports), optionally pinned
    to `node` by node affinity as a zonal or local disk is. Nothing is mounted on kwok nodes. The volumes
    are deleted at the end."""
    made: list[str] = []

    def make(namespace: str, claim: str, modes: list[str], node: str | None = None) -> str:
        name = f"kubetune-test-{secrets.token_hex(4)}"
        spec: dict[str, Any] = {
            "capacity": {"storage": "1Gi"},
            "accessModes": modes,
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": f"/tmp/kubetune-test/{name}", "type": "DirectoryOrCreate"},
            "claimRef": {"namespace": namespace, "name": claim},
        }
        if node:
            term = {
                "matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]
            }
            spec["nodeAffinity"] = {"required": {"nodeSelectorTerms": [term]}}
        core_v1.create_persistent_volume(
            {"metadata": {"name": name, "labels": {"kubetune.io/test": "true"}}, "spec": spec}
        )
        made.append(name)
        core_v1.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": modes,
                    "storageClassName": "",
                    "volumeName": name,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )

        # Bound before pods use it: a pod created earlier waits for the scheduler's next retry.
        def bound() -> Any:
            phase = core_v1.read_namespaced_persistent_volume_claim(claim, namespace).status.phase
            return phase == "Bound" or NotYet(phase)

        wait_for(bound, timeout=30, desc=f"claim {namespace}/{claim} Bound")
        return claim

    yield make
    for name in made:
        core_v1.delete_persistent_volume(name)
