"""The traps a new user hit: a changed hyperparameter silently ignored on resume, a finished directory
re-run returning the old model, signals during start-up, Ctrl-C reported as SIGTERM, a silent console."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .helpers import Job, tiny_spec, wait_for

pytestmark = pytest.mark.trainer


def _snapshot(job: Job) -> dict[str, tuple[int, bytes]]:
    """Every file of the run except progress.json, with its mtime: what a refused run must not touch."""
    return {
        str(p.relative_to(job.ckpt)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(job.ckpt.rglob("*"))
        if p.is_file() and p.name != "progress.json"
    }


@pytest.mark.timeout(300)
def test_changed_learning_rate_after_sigterm_is_refused_naming_old_and_new(
    job_factory: Callable[..., Job],
) -> None:
    """Before: the optimizer state restored the old learningRate, weights equalled the 0.001 run's, and
    the checkpoint's spec said 0.01."""
    job = job_factory(tiny_spec(training={"maxSteps": 40, "learningRate": 0.001}))
    proc = job.start()
    assert job.interrupt_at(proc, 6, signal.SIGTERM) == 143
    before = _snapshot(job)
    for change in ("training.learningRate=0.01", "training.weightDecay=0.2"):
        assert job.run("--set", change) == 2, job.log_text()
        message = job.termination()["message"]
        field, _, value = change.partition("=")
        assert message.startswith(f"{field}: changed from ")
        assert f"to {float(value)!r}" in message and "new --checkpoint-dir" in message
    assert _snapshot(job) == before
    assert job.run() == 0  # the unchanged spec still resumes
    assert job.termination()["step"] == 40


@pytest.mark.timeout(300)
def test_finished_run_rerun_unchanged_says_so_and_changed_is_refused(job_factory: Callable[..., Job]) -> None:
    """Before: a finished runs/<name> re-run with another learningRate re-exported the same weights."""
    job = job_factory(tiny_spec(training={"maxSteps": 8}))
    assert job.run() == 0
    before = _snapshot(job)
    assert job.run("--set", "training.learningRate=0.1") == 2
    assert job.termination()["message"].startswith("training.learningRate: changed from 0.001 to 0.1")
    assert job.run() == 0
    term = job.termination()
    assert term["reason"] == "Completed" and "already finished (8 steps)" in term["message"]
    assert str(job.ckpt / "final") in term["message"]
    assert _snapshot(job) == before  # nothing re-trained, re-saved or re-exported
    assert job.run("--set", "training.maxSteps=12") == 0  # extending a finished run trains on
    assert job.termination()["step"] == 12 and _snapshot(job) != before


def _catches_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.timeout(180)
def test_sigterm_during_startup_exits_143_with_a_termination_message(job_factory: Callable[..., Job]) -> None:
    """Before: the handler was installed after torch was imported; a SIGTERM before that killed the
    process with no message (exit -15)."""
    job = job_factory(tiny_spec())
    proc = job.start()
    wait_for(lambda: _catches_sigterm(proc.pid) or proc.poll() is not None, 60, "the SIGTERM handler")
    assert not _torch_loaded(proc.pid), "the handler must be installed before torch is imported"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, job.log_text()
    term = job.termination()
    assert term["reason"] == "Preempted" and "SIGTERM before the first step" in term["message"]
    assert not list(job.ckpt.glob("checkpoints/*.pt"))  # nothing trained, nothing saved


@pytest.mark.timeout(180)
def test_ctrl_c_is_reported_as_sigint(job_factory: Callable[..., Job]) -> None:
    job = job_factory(tiny_spec(training={"maxSteps": 200}))
    proc = job.start()
    assert job.interrupt_at(proc, 3, signal.SIGINT) == 143
    term = job.termination()
    assert term["message"].startswith(f"stopped by SIGINT at step {term['step']}; checkpoint saved")


@pytest.mark.timeout(180)
def test_pod_logs_get_a_progress_line_per_interval(job_factory: Callable[..., Job]) -> None:
    """Before: nothing between the parameter count and the end of the first epoch."""
    job = job_factory(tiny_spec(training={"maxSteps": 60}, checkpoint={"everySteps": 20}))
    proc = job.start("--log-every-seconds", "0.3")
    assert proc.wait(timeout=150) == 0
    lines = [line for line in job.log_text().splitlines() if line.startswith("step ")]
    assert len(lines) >= 2, job.log_text()
    for field in ("/60 (", "| epoch ", "| loss ", "| lr ", " samples/s", "| ETA ", "| ckpt "):
        assert all(field in line for line in lines), (field, lines)
    assert lines[-1].startswith("step 60/60 (100%)")
    steps = [int(line.split()[1].split("/")[0]) for line in lines]
    assert steps == sorted(set(steps))  # one line per interval, never the same step twice


@pytest.mark.timeout(180)
def test_a_terminal_gets_a_live_progress_bar(job_factory: Callable[..., Job]) -> None:
    import pty

    job = job_factory(tiny_spec(training={"maxSteps": 30}))
    leader, follower = pty.openpty()
    proc = subprocess.Popen(job.argv(), env=job.env(COLUMNS="200"), stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the follower side closed: the process ended
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=30) == 0
    text = out.decode(errors="replace")
    assert "train" in text and "step 30/30 (100%)" in text and "\x1b[" in text, text[-2000:]


def test_a_checkpoint_of_another_recipe_or_timm_is_refused_by_name() -> None:
    """Checkpoints of the trainer before timm's param groups and schedulers (recipe 1) cannot continue
    here; one written under another timm release cannot either when its augmentation or mixup drew from
    timm's code (elsewhere only a warning: the numbers may differ in their last bits)."""
    from kubetune_trainer import config as cfg_mod
    from kubetune_trainer.ledger import RECIPE_VERSION, _version_mismatch, trainer_versions

    plain = cfg_mod.parse_spec(tiny_spec())
    now = trainer_versions()
    assert now["recipe"] == RECIPE_VERSION and _version_mismatch(now, plain) is None
    why = _version_mismatch({}, plain)  # written before versions were recorded: recipe 1
    assert why is not None and why.startswith(
        "image: the checkpoint was written by a trainer with training recipe v1"
    )
    assert "new metadata.name" in why
    other = {"recipe": RECIPE_VERSION, "timm": "0.9.16"}
    assert _version_mismatch(other, plain) is None
    mixed = cfg_mod.parse_spec(tiny_spec(training={"mixup": {}}))
    why = _version_mismatch(other, mixed)
    assert why is not None and "timm 0.9.16 wrote the checkpoint" in why and "training.mixup" in why
