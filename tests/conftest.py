"""Root pytest configuration: the Kubernetes cluster fixtures.

``kube`` (session) gives tests a real API server: the cluster named by KUBETUNE_TEST_KUBECONFIG when
set, else the local kwok cluster from ``hack/cluster.sh`` (reused when already up, started otherwise).
``namespace`` (function) gives each test its own namespace. Both are lazy: only tests that request
them (the ``cluster``-marked ones) touch a cluster, so unit tests need no binaries and no API.

Several pytest sessions may share one local cluster: each registers itself under
``<state dir>/users/``; the last one to leave stops the cluster, and only when a fixture started it
(a cluster started by ``make cluster-up`` is left running). KUBETUNE_KEEP_CLUSTER=1 always leaves it up.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:  # `import kubeutil` from any test module
    sys.path.insert(0, str(TESTS))

from kubeutil import BIN_DIR, CLUSTER_SH  # noqa: E402

STATE_DIR = Path(os.environ.get("KUBETUNE_CLUSTER_DIR") or REPO / ".cluster").resolve()


@dataclass
class Kube:
    """Handle on the cluster under test."""

    kubeconfig: Path
    """Admin kubeconfig (absolute path)."""
    kubectl_path: Path
    """Our pinned kubectl (never the system one)."""
    local: bool
    """True for the hack/cluster.sh cluster, False for KUBETUNE_TEST_KUBECONFIG."""
    env: dict[str, str] = field(default_factory=dict)

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run our kubectl against this cluster; text stdout/stderr captured. On failure with
        ``check`` the error includes kubectl's stderr."""
        cmd = [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def api_client(self) -> Any:
        """A new ``kubernetes.client.ApiClient`` for this cluster (close it, or use it as a context manager)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig), persist_config=False)


def _cluster_sh(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(CLUSTER_SH), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Users:
    """Pytest sessions using the local cluster, as files <state>/users/<pid> under an flock."""

    def __init__(self, state: Path) -> None:
        self.dir = state / "users"
        self.lock_path = state / ".users.lock"
        self.marker = state / "started-by-fixture"

    def __enter__(self) -> _Users:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)

    def others(self) -> list[int]:
        pids = [int(p.name) for p in self.dir.glob("*") if p.name.isdigit()]
        return [p for p in pids if p != os.getpid() and _pid_alive(p)]


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    """The cluster under test (see module docstring)."""
    pytest.importorskip("kubernetes", reason="the kubernetes client is needed for cluster tests")
    external = os.environ.get("KUBETUNE_TEST_KUBECONFIG")
    kubectl = BIN_DIR / "kubectl"
    if not kubectl.exists():
        pytest.fail(f"{kubectl} is missing: run `make setup` (hack/build-binaries.sh) first", pytrace=False)
    if external:
        yield Kube(kubeconfig=Path(external).resolve(), kubectl_path=kubectl, local=False)
        return

    with _Users(STATE_DIR) as users:
        if _cluster_sh("status").returncode != 0:
            up = _cluster_sh("up")
            if up.returncode != 0:
                pytest.fail(f"hack/cluster.sh up failed:\n{up.stderr}\n{up.stdout}", pytrace=False)
            # hack/cluster.sh up wipes the state dir's contents, users/ included: recreate ours.
            users.dir.mkdir(parents=True, exist_ok=True)
            users.marker.touch()
        (users.dir / str(os.getpid())).touch()

    try:
        yield Kube(kubeconfig=STATE_DIR / "kubeconfig", kubectl_path=kubectl, local=True)
    finally:
        with _Users(STATE_DIR) as users:
            (users.dir / str(os.getpid())).unlink(missing_ok=True)
            last = not users.others()
            if last and users.marker.exists() and os.environ.get("KUBETUNE_KEEP_CLUSTER") != "1":
                _cluster_sh("down")
                users.marker.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def cluster(kube: Kube) -> Kube:
    """Alias of ``kube``."""
    return kube


@pytest.fixture(scope="session")
def api_client(kube: Kube) -> Iterator[Any]:
    """One shared ``kubernetes.client.ApiClient`` for the session."""
    with kube.api_client() as api:
        yield api


@pytest.fixture
def core_v1(api_client: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(api_client)


def _namespace_name(test_name: str) -> str:
    """DNS-1123 label from the test name plus a random suffix (a namespace of the same name from an
    earlier run may still be terminating)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", test_name.lower()).strip("-") or "test"
    suffix = secrets.token_hex(3)
    return f"{slug[: 63 - len(suffix) - 1].rstrip('-')}-{suffix}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, api_client: Any) -> Iterator[str]:
    """A fresh namespace for this test (deleted afterwards without waiting). Yields its name once the
    service-account controller has created the ``default`` ServiceAccount, so pods can be created."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from kubeutil import wait_for

    core = client.CoreV1Api(api_client)
    name = _namespace_name(request.node.name)
    core.create_namespace({"metadata": {"name": name, "labels": {"kubetune.io/test": "true"}}})

    def default_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    wait_for(default_sa, timeout=30, desc=f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def kwok_node(core_v1: Any) -> Iterator[Any]:
    """Factory for dedicated fake nodes: ``kwok_node(gpus=8, labels=..., taints=...) -> name``.

    Each node is tainted ``kubetune.io/dedicated=<name>:NoSchedule`` unless ``taints`` is given (pods opt
    in with ``kubeutil.dedicated_toleration(name)``) and is deleted after the test, so tests that fill,
    drain or delete a node never disturb the shared ones."""
    from kubernetes.client.exceptions import ApiException

    from kubeutil import create_kwok_node, delete_node_if_exists

    created: list[str] = []

    def make(**kwargs: Any) -> str:
        name = f"kwok-test-{secrets.token_hex(4)}"
        created.append(name)
        create_kwok_node(core_v1, name, **kwargs)
        return name

    yield make
    for name in created:
        # Pods left on the node go first (kwok removes them at once); pods of a node that is already
        # gone would wait for PodGC's 40 s quarantine and hold up their namespace's deletion.
        for pod in core_v1.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}").items:
            try:
                core_v1.delete_namespaced_pod(
                    pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
                )
            except ApiException as exc:
                if exc.status != 404:
                    raise
        delete_node_if_exists(core_v1, name)
