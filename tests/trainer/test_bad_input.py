"""Bad input exits 2 with a message naming what to fix, and never damages an existing checkpoint."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune_trainer import cli

from .helpers import Job, tiny_spec, write_digits

pytestmark = pytest.mark.trainer


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> object:
    """cli.main installs its SIGTERM and SIGINT handlers; pytest's own come back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def in_process(job: Job, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    """cli.main in this process (torch is imported once); the exit-code contract is the same."""
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(job.term_log))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return cli.main(["-f", str(job.manifest), "--checkpoint-dir", str(job.ckpt), *extra])


def expect_invalid(job: Job, *extra: str, monkeypatch: pytest.MonkeyPatch | None = None) -> str:
    code = in_process(job, monkeypatch, *extra) if monkeypatch else job.run(*extra, timeout=120)
    assert code == 2, job.log_text()
    term = json.loads(job.term_log.read_text())
    assert term["reason"] == "InvalidConfig"
    return str(term["message"])


@pytest.mark.timeout(120)
def test_bad_spec_subprocess_exit_code_2(job_factory: Callable[..., Job]) -> None:
    job = job_factory(tiny_spec())
    assert "training.learningrate: unknown field; did you mean learningRate?" in expect_invalid(
        job, "--set", "training.learningrate=0.1"
    )
    assert not job.ckpt.exists() or not any(job.ckpt.glob("checkpoints/*"))


@pytest.mark.timeout(300)
def test_bad_specs_exit_2(
    tmp_path: Path, job_factory: Callable[..., Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = job_factory(tiny_spec())

    def invalid(*extra: str) -> str:
        return expect_invalid(job, *extra, monkeypatch=monkeypatch)

    msg = invalid("--set", "training.optimizer=adamww")
    assert "training.optimizer: " in msg and "adamw" in msg and "closest" in msg
    assert "training.batchSize: must be > 0, got -4" in invalid("--set", "training.batchSize=-4")
    msg = invalid("--set", "model.name=resnet5O")
    assert "model.name: 'resnet5O' is not a timm model; closest:" in msg and "resnet50" in msg
    assert "training.batchSize: 512 is larger than the training set" in invalid(
        "--set", "training.batchSize=512"
    )
    missing = invalid("--set", "data.format=imagefolder", "--set", "data.path=/does/not/exist")
    assert "data.path: /does/not/exist does not exist" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no class folders" in invalid(
        "--set", "data.format=imagefolder", "--set", f"data.path={empty}"
    )
    assert "model.weights: /nope.safetensors is not a file" in invalid(
        "--set", "model.weights=/nope.safetensors"
    )


@pytest.mark.timeout(300)
def test_unreadable_images_skipped_below_threshold_and_fatal_above(
    tmp_path: Path,
    job_factory: Callable[..., Job],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = write_digits(tmp_path / "digits", range(3))
    for i in range(5):
        (root / "0" / f"broken{i}.png").write_bytes(b"not a png")
    spec = tiny_spec(data={"format": "imagefolder", "path": str(root)}, training={"maxSteps": 2})
    job = job_factory(spec)
    assert in_process(job, monkeypatch) == 0
    assert "skipping unreadable image" in caplog.text
    for i in range(200):
        (root / "1" / f"broken{i}.png").write_bytes(b"")
    fresh = job_factory(spec)
    msg = expect_invalid(fresh, monkeypatch=monkeypatch)
    assert "data.path: 205 of" in msg and "are unreadable" in msg


@pytest.mark.timeout(300)
def test_config_change_that_breaks_resume_is_refused(
    job_factory: Callable[..., Job], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    job = job_factory(tiny_spec(training={"maxSteps": 4}))
    assert in_process(job, monkeypatch) == 0
    ckpts = sorted(p.read_bytes() for p in job.ckpt.glob("checkpoints/*"))
    msg = expect_invalid(job, "--set", "training.batchSize=4", monkeypatch=monkeypatch)
    assert msg.startswith("training.batchSize: changed from 8 to 4 since the checkpoint")
    msg = expect_invalid(job, "--set", "model.name=test_vit", monkeypatch=monkeypatch)
    assert "model.name: changed from 'test_resnet' to 'test_vit'" in msg
    assert sorted(p.read_bytes() for p in job.ckpt.glob("checkpoints/*")) == ckpts
    # Extending training is allowed and continues from the checkpoint.
    assert in_process(job, monkeypatch, "--set", "training.maxSteps=6") == 0
    assert job.termination()["step"] == 6 and "resumed from" in caplog.text
