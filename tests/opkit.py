"""Helpers for operator tests and benches: the operator run as a real process against the cluster, and
manifests. bench/ imports it as `tests.opkit`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

try:  # under pytest, tests/ is on sys.path (tests/conftest.py)
    from kubeutil import REPO, wait_for
except ImportError:  # bench/, run from the repository root
    from tests.kubeutil import REPO, wait_for

CRD_DIR = REPO / "charts" / "kubetune" / "crds"
TRAINER_IMAGE = "registry.invalid/kubetune/trainer:test"  # kwok never pulls images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OperatorProcess:
    """One `kubetune-operator` replica watching one namespace; logs in `log_path`. `fast` (tests) shortens
    the retry backoff and the progress scrape to 1 s; benches measure the defaults."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_path: Path,
        *extra: str,
        fast: bool = True,
        trainer_image: str = TRAINER_IMAGE,
    ) -> None:
        self.kubeconfig, self.namespace, self.log_path = kubeconfig, namespace, log_path
        self.extra = (*(("--backoff-base-seconds", "1", "--scrape-interval", "1") if fast else ()), *extra)
        self.trainer_image = trainer_image
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProcess:
        cmd = [
            sys.executable, "-m", "kubetune_operator",
            "--kubeconfig", str(self.kubeconfig),
            "--namespace", self.namespace,
            "--leader-namespace", self.namespace,
            "--metrics-port", str(self.metrics_port),
            "--health-port", str(self.health_port),
            "--trainer-image", self.trainer_image,
            *self.extra,
        ]  # fmt: skip
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._healthy, timeout=30, desc=f"operator healthz on :{self.health_port}")
        except BaseException as err:
            # Never leave a half-started operator behind (it would reconcile on after the test), and
            # show its log: the reason it did not get healthy is there.
            self.stop()
            raise AssertionError(f"{err}\noperator log:\n{self.tail()}") from err
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def samples(self) -> dict[str, float]:
        """Plain samples by name+labels, as the exposition format spells them."""
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(self.metrics()):
            for s in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def peak_rss_mb(self) -> float:
        assert self.proc is not None, "not started"
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        """Send `sig` to the operator process alone: SIGSTOP freezes it (as a stalled node would), SIGCONT
        thaws it, SIGTERM asks it to shut down without waiting for it to exit."""
        assert self.proc is not None, "not started"
        os.kill(self.proc.pid, sig)

    @property
    def identity(self) -> str:
        """The Lease holder identity this replica writes (cli.main: host name and PID)."""
        assert self.proc is not None, "not started"
        return f"{socket.gethostname()}-{self.proc.pid}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def probes(self) -> dict[str, Any]:
        """kopf's /healthz probe results (kopf caches them for up to 10 s), e.g. {"leader": true}."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
            return dict(json.loads(r.read().decode()))


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"name": "test_resnet", "numClasses": 10},
        "data": {"format": "synthetic"},
        "training": {"maxSteps": 100},
        "metrics": {"port": 0},  # kwok pod IPs are fake: nothing to scrape
        "resources": {"gpus": 1},
        "tolerations": [
            {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
        ],
    }
    base.update(spec)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": base,
    }


def apply(kube: Any, namespace: str, manifest: dict[str, Any]) -> None:
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
