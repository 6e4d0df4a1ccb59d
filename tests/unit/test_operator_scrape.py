"""The operator reads progress from a real trainer metrics endpoint (the trainer's own Prometheus
telemetry, served on loopback), and its CLI rejects bad flags with a message naming the flag."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime

import pytest
from kubernetes import client as k8s_client

from kubetune_operator import lifecycle, pods
from kubetune_operator.api import parse_job
from kubetune_operator.controller import Controller, ControllerConfig
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import parse_trainer_metrics
from kubetune_operator.status import JobStatus

pytestmark = pytest.mark.unit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def trainer_metrics():
    pytest.importorskip("torch")
    from kubetune_trainer.telemetry import RunInfo
    from kubetune_trainer.telemetry.prometheus import PrometheusTelemetry

    port = free_port()
    tel = PrometheusTelemetry(port)
    tel.start(
        RunInfo(
            job="ft", namespace="ml", total_steps=200, start_step=0, spec={}, run_id="r", first_start=True
        )
    )
    yield tel, port
    tel.finish(0)


def test_parse_real_trainer_endpoint(trainer_metrics):
    tel, port = trainer_metrics
    tel.log_step(
        50, {"epoch": 1.5, "samples": 64, "samples_per_second": 320.0, "loss": 0.25, "learning_rate": 1e-3}
    )
    tel.checkpoint_saved(40, 0.3)
    tel.log_eval(50, {"eval_top1": 0.91, "eval_loss": 0.3, "eval_top5": 1.0})
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    p = parse_trainer_metrics(text)
    assert p is not None
    assert (p.step, p.total_steps, p.epoch, p.checkpoint_step) == (50, 200, 1, 40)
    assert p.samples_per_second == 320.0 and p.loss == 0.25 and p.accuracy == pytest.approx(0.91)
    assert parse_trainer_metrics("# nothing here\n") is None


def test_controller_scrape_feeds_status(trainer_metrics):
    tel, port = trainer_metrics
    cfg = k8s_client.Configuration()
    cfg.host = "https://127.0.0.1:1"  # never contacted: scraping talks only to the pod
    body = {
        "metadata": {"name": "ft", "namespace": "ml", "uid": "u"},
        "spec": {"image": "i", "model": {"name": "m"}, "metrics": {"port": port}},
    }
    job = parse_job(body)
    pod = pods.PodView(name="ft-a1-0", attempt=1, rank=0, phase="Running", pod_ip="127.0.0.1")
    status = {"phase": "Running", "attempt": 1}

    async def scrape_twice():
        ctrl = Controller(Kube(cfg), ControllerConfig(scrape_interval=0.05))
        tel.log_step(
            10, {"epoch": 0.1, "samples": 32, "samples_per_second": 100.0, "loss": 1.0, "learning_rate": 1e-3}
        )
        first = await ctrl._scrape(("ml", "ft"), job, JobStatus.parse(status), [pod])
        await asyncio.sleep(0.1)  # two scrapes one interval apart give a step rate
        tel.log_step(
            20, {"epoch": 0.2, "samples": 32, "samples_per_second": 100.0, "loss": 0.9, "learning_rate": 1e-3}
        )
        second = await ctrl._scrape(("ml", "ft"), job, JobStatus.parse(status), [pod])
        await ctrl.kube.close()
        return first, second

    first, second = asyncio.run(scrape_twice())
    assert first is not None and first.step == 10
    assert (
        second is not None and second.step == 20 and second.steps_per_second and second.steps_per_second > 0
    )
    obs = lifecycle.Observed(job=job, status=status, pods=[pod], now=datetime.now(UTC), progress=second)
    st = lifecycle.plan(obs, lifecycle.Settings()).status
    assert (
        st["progress"]["step"] == 20
        and st["progress"]["totalSteps"] == 200
        and st["progress"]["percent"] == 10
    )
    assert st["progress"]["eta"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--metrics-port", "abc"], "--metrics-port"),
        (["--workers", "-1"], "--workers"),
        (["--workers", "0"], "--workers"),
        (["--backoff-base-seconds", "soon"], "--backoff-base-seconds"),
        (["--namespace", "a", "--all-namespaces"], "not allowed with"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
)
def test_cli_rejects_bad_flags(args, needle):
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_operator", *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
