"""hack/cluster.sh itself: up is idempotent, down leaves nothing running, a crash is recovered from,
and a component that fails to start is named with its log. Each test runs its own second cluster
(own state directory and ports), so the session cluster other tests use is never touched."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubeutil import BIN_DIR, CLUSTER_SH, process_alive, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports() -> tuple[int, int]:
    """An apiserver port and a base of 5 consecutive free ports, away from the defaults."""
    # Below the ephemeral port range (32768+), where outgoing connections could take a port at any time.
    for base in range(24000 + (os.getpid() % 100) * 20, 32000, 20):
        if all(_free(p) for p in (base, *range(base + 1, base + 7))):
            return base, base + 1
    raise RuntimeError("no free ports")


@dataclass
class SideCluster:
    dir: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(CLUSTER_SH), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **self.env},
        )

    def pids(self) -> dict[str, int]:
        return {c: int((self.dir / "pids" / f"{c}.pid").read_text()) for c in COMPONENTS}

    def processes(self) -> list[int]:
        """PIDs of live processes whose command line mentions this cluster's state directory."""
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.dir) in cmd and "pytest" not in cmd and process_alive(int(proc.name)):
                found.append(int(proc.name))
        return found


@pytest.fixture
def side_cluster(tmp_path: Path) -> Iterator[SideCluster]:
    if not (BIN_DIR / "kube-apiserver").exists():
        pytest.fail(f"{BIN_DIR}/kube-apiserver is missing: run `make setup` first", pytrace=False)
    base, api = _free_ports()
    side = SideCluster(
        dir=tmp_path / "cluster",
        env={
            "KUBETUNE_CLUSTER_DIR": str(tmp_path / "cluster"),
            "KUBETUNE_APISERVER_PORT": str(api),
            "KUBETUNE_PORT_BASE": str(base + 2),
        },
    )
    yield side
    side.run("down")
    assert side.processes() == []


def _kubectl(side: SideCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN_DIR / "kubectl"), "--kubeconfig", str(side.dir / "kubeconfig"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_up_is_idempotent_down_stops_everything_and_up_works_again(side_cluster: SideCluster) -> None:
    t0 = time.monotonic()
    up = side_cluster.run("up")
    assert up.returncode == 0, up.stderr
    cold = time.monotonic() - t0
    assert f"export KUBECONFIG={side_cluster.dir}/kubeconfig" in up.stdout
    assert cold < 60, f"up took {cold:.1f}s"
    nodes = _kubectl(side_cluster, "get", "nodes", "-l", "kubetune.io/node-kind=kwok", "-o", "name")
    assert "node/kwok-gpu-0" in nodes.stdout, nodes.stderr

    pids = side_cluster.pids()
    again = side_cluster.run("up")
    assert again.returncode == 0, again.stderr
    assert "already up" in again.stderr
    assert side_cluster.pids() == pids, "a second up must not restart anything"
    assert side_cluster.run("status").returncode == 0

    down = side_cluster.run("down")
    assert down.returncode == 0, down.stderr
    assert side_cluster.processes() == []
    assert not any(process_alive(p) for p in pids.values())
    assert side_cluster.run("status").returncode != 0

    up2 = side_cluster.run("up")
    assert up2.returncode == 0, up2.stderr
    assert _kubectl(side_cluster, "get", "--raw", "/readyz").stdout.strip() == "ok"


def test_up_recovers_after_a_crash(side_cluster: SideCluster) -> None:
    assert side_cluster.run("up").returncode == 0
    pids = side_cluster.pids()
    # A crash: the apiserver dies; the rest keep running with stale state behind them.
    os.kill(pids["kube-apiserver"], signal.SIGKILL)
    wait_for(
        lambda: side_cluster.run("status").returncode != 0,
        timeout=10,
        desc="status to notice the dead apiserver",
    )

    up = side_cluster.run("up")
    assert up.returncode == 0, up.stderr
    assert "cleaning up a previous run" in up.stderr
    fresh = side_cluster.pids()
    assert all(fresh[c] != pids[c] for c in COMPONENTS)
    assert not any(process_alive(p) for p in pids.values())
    assert _kubectl(side_cluster, "get", "--raw", "/readyz").stdout.strip() == "ok"


def test_component_failing_to_start_is_named_with_its_log(side_cluster: SideCluster) -> None:
    side_cluster.env["KUBETUNE_EXTRA_ARGS_KUBE_SCHEDULER"] = "--no-such-flag=1"
    up = side_cluster.run("up")
    assert up.returncode != 0
    assert "error: kube-scheduler" in up.stderr, up.stderr
    assert "last 30 lines" in up.stderr
    assert "unknown flag: --no-such-flag" in up.stderr, up.stderr
    # What had started was stopped again.
    assert side_cluster.processes() == []


def test_busy_port_is_reported(side_cluster: SideCluster) -> None:
    api_port = int(side_cluster.env["KUBETUNE_APISERVER_PORT"])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", api_port))
        squatter.listen()
        up = side_cluster.run("up")
    assert up.returncode != 0
    assert "kube-apiserver" in up.stderr and f"port {api_port} is in use" in up.stderr, up.stderr
    assert side_cluster.processes() == []
