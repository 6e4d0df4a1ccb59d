"""Fixtures for operator tests on the real control plane: the CRD installed from the chart, and the
operator itself run as real processes (`python -m kubetune_operator`) against the cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeutil import wait_for
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
