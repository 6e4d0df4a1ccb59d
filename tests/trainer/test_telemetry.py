"""Telemetry seen from outside: the Prometheus endpoint over HTTP, and W&B offline run files."""

from __future__ import annotations

import signal
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wandbfile import read_wandb_records

from .helpers import Job, tiny_spec, wait_for

pytestmark = pytest.mark.trainer

METRICS = {
    "kubetune_trainer_step",
    "kubetune_trainer_total_steps",
    "kubetune_trainer_epoch",
    "kubetune_trainer_samples",  # exposed as kubetune_trainer_samples_total
    "kubetune_trainer_samples_per_second",
    "kubetune_trainer_loss",
    "kubetune_trainer_learning_rate",
    "kubetune_trainer_eval_accuracy",
    "kubetune_trainer_checkpoint_seconds",
    "kubetune_trainer_checkpoint_step",
    "kubetune_trainer_resumes",
    "kubetune_trainer_lost_steps",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, dict[str, Any]]:
    """{family: {"type": ..., "samples": {sample_name: value}}}; empty if not serving yet."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = {"type": fam.type, "samples": {s.name: (s.value, s.labels) for s in fam.samples}}
    return out


@pytest.mark.timeout(240)
def test_metrics_endpoint_during_training_and_after_resume(job_factory: Callable[..., Job]) -> None:
    port = free_port()
    job = job_factory(
        tiny_spec(training={"maxSteps": 400}, checkpoint={"everySteps": 5}, metrics={"port": port})
    )
    env = {"KUBETUNE_JOB": "demo", "KUBETUNE_NAMESPACE": "team-a"}
    proc = job.start(**env)
    seen: dict[str, dict[str, Any]] = {}

    def trained_past_an_epoch() -> bool:
        nonlocal seen
        seen = scrape(port)
        step = seen.get("kubetune_trainer_checkpoint_step", {}).get("samples", {})
        acc = seen.get("kubetune_trainer_eval_accuracy", {}).get("samples", {})
        return bool(step and acc and next(iter(step.values()))[0] >= 5) or proc.poll() is not None

    wait_for(trained_past_an_epoch, 120, "an eval and a checkpoint in /metrics")
    assert proc.poll() is None, job.log_text()
    assert set(seen) >= METRICS, METRICS - set(seen)
    value, labels = seen["kubetune_trainer_step"]["samples"]["kubetune_trainer_step"]
    assert labels == {"job": "demo", "namespace": "team-a"} and value >= 5
    assert seen["kubetune_trainer_total_steps"]["samples"]["kubetune_trainer_total_steps"][0] == 400
    assert seen["kubetune_trainer_samples"]["samples"]["kubetune_trainer_samples_total"][0] >= 5 * 8
    assert seen["kubetune_trainer_checkpoint_seconds"]["type"] == "histogram"
    assert (
        seen["kubetune_trainer_checkpoint_seconds"]["samples"]["kubetune_trainer_checkpoint_seconds_count"][0]
        >= 1
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143

    proc = job.start(**env)
    wait_for(
        lambda: scrape(port).get("kubetune_trainer_resumes") or proc.poll() is not None,
        120,
        "restarted /metrics",
    )
    again = scrape(port)
    assert again["kubetune_trainer_resumes"]["samples"]["kubetune_trainer_resumes_total"][0] == 1
    assert again["kubetune_trainer_lost_steps"]["samples"]["kubetune_trainer_lost_steps_total"][0] == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_wandb_one_run_across_restarts_no_step_twice_or_missing(
    tmp_path: Path, job_factory: Callable[..., Job]
) -> None:
    total = 20
    job = job_factory(
        tiny_spec(
            training={"maxSteps": total},
            checkpoint={"everySteps": 4},
            wandb={"mode": "offline", "project": "kubetune-test"},
        )
    )
    env = {"WANDB_DIR": str(tmp_path / "wb"), "WANDB_MODE": "offline"}
    (tmp_path / "wb").mkdir()
    for stop_at in (5, 13):
        proc = job.start(**env)
        assert job.interrupt_at(proc, stop_at, signal.SIGTERM) == 143, job.log_text()
    assert job.run(**env) == 0, job.log_text()

    runs = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 3, runs
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(ids) == 1, ids
    steps: list[int] = []
    preempting = 0
    for run in runs:
        (wandb_file,) = run.glob("run-*.wandb")
        for rec in read_wandb_records(wandb_file):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                steps.append(rec.history.step.num)
            preempting += kind == "preempting"
    assert steps == list(range(1, total + 1)), steps
    assert preempting == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_wandb_never_touches_the_network(tmp_path: Path, job_factory: Callable[..., Job]) -> None:
    """An offline W&B run opens no connection, at exit included. wandb (0.31) decides about its own SDK
    telemetry from process-wide settings, not from init(mode=...): left online it posted to W&B at exit,
    and in a pod without egress that was two 5 s DNS timeouts between the SIGTERM checkpoint and the exit.
    Every HTTP(S) request of the trainer process goes through the proxy below; none may arrive."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    proxy = f"http://127.0.0.1:{listener.getsockname()[1]}"
    job = job_factory(
        tiny_spec(
            training={"maxSteps": 400},
            checkpoint={"everySteps": 4},
            wandb={"mode": "offline", "project": "kubetune-test"},
        )
    )
    (tmp_path / "wb").mkdir()
    env = {
        "WANDB_DIR": str(tmp_path / "wb"),
        "WANDB_MODE": "online",  # what a pod has when nothing sets it: the job's mode must win
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "NO_PROXY": "",
    }
    proc = job.start(**env)
    connections = 0
    try:
        wait_for(lambda: (job.progress().get("step") or 0) >= 8, 120, "8 steps")
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None:
            try:
                conn, _ = listener.accept()
                conn.close()
                connections += 1
            except TimeoutError:
                pass
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
    assert proc.wait(timeout=60) == 143, job.log_text()
    assert connections == 0, f"{connections} connection(s) to the proxy from an offline run\n{job.log_text()}"
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*")), "no offline run written"
