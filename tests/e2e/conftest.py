"""Fixtures of the real-node end-to-end tests: one cluster (control plane, kwok nodes and the real
kubelet node) for the whole e2e session, stopped at its end unless KUBETUNE_E2E_KEEP is set."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import scenario as sc


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "the real node needs root"
    for tool in ("containerd", "runc", "buildah", "debootstrap"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":")):
            return f"{tool} missing (hack/apt-packages-real-node.txt)"
    if not (sc.BIN / "kubelet").exists():
        return "no kubelet (hack/build-binaries.sh)"
    return None


@pytest.fixture(scope="session")
def env() -> Iterator[sc.Env]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = sc.Cluster()
    try:  # a failed `up` leaves parts behind too: `down` cleans them
        cluster.up()
        cluster.images()
        e = sc.Env(cluster)
        sc.prepare_namespace(e)
        sc.install_operator(e)
        yield e
    finally:
        if not os.environ.get("KUBETUNE_E2E_KEEP"):
            cluster.down()


@pytest.fixture(scope="session")
def digits(env: sc.Env) -> Path:
    return sc.dataset(env)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """An e2e test's timeout covers the test itself, not the session fixture's setup that the first one
    pays for (cluster, a cold image build of ~10 min): that setup's own steps have their timeouts."""
    default = float(config.getini("timeout") or 900)
    for item in items:
        if not item.nodeid.startswith("tests/e2e/"):
            continue
        marker = item.get_closest_marker("timeout")
        args, kwargs = (marker.args, marker.kwargs) if marker is not None else ((default,), {})
        item.add_marker(pytest.mark.timeout(*args, **{**kwargs, "func_only": True}), append=False)
