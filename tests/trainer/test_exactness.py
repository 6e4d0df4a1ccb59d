"""The headline: a run interrupted by SIGTERM and SIGKILL (even mid-save) ends bitwise equal to an
uninterrupted one; SIGTERM loses no step, SIGKILL at most the steps since the last checkpoint."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable

import pytest
from safetensors.torch import load_file

from .helpers import Job, tiny_spec, wait_for

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

EVERY = 3
SPEC = tiny_spec(
    data={"numWorkers": 1},
    training={
        "maxSteps": 16,
        "batchSize": 8,
        "gradAccumulation": 2,
        "warmupSteps": 2,
        "gradClip": 1.0,
        "labelSmoothing": 0.1,
        "ema": True,
    },
    checkpoint={"everySteps": EVERY},
)


@pytest.mark.timeout(600)
def test_interrupted_run_is_bitwise_equal(job_factory: Callable[..., Job]) -> None:
    ref = job_factory(SPEC, "ref")
    assert ref.run() == 0, ref.log_text()
    assert ref.termination()["reason"] == "Completed"

    job = job_factory(SPEC, "interrupted")
    rng = random.Random(1234)
    # 1) SIGTERM at an arbitrary step: exit 143, checkpoint at exactly the step reached, nothing lost.
    proc = job.start()
    assert job.interrupt_at(proc, rng.randint(2, 5), signal.SIGTERM) == 143, job.log_text()
    term = job.termination()
    assert term["reason"] == "Preempted" and term["checkpointStep"] == term["step"] == job.progress()["step"]
    assert term["checkpoint"].endswith(f"step-{term['step']:08d}.pt") and term["lostSteps"] == 0

    # 2) SIGKILL at an arbitrary later step: at most EVERY steps are redone.
    proc = job.start()
    reached = job.interrupt_at(proc, term["step"] + rng.randint(2, 5), signal.SIGKILL)
    assert reached == -signal.SIGKILL
    before_kill = job.progress()["step"]

    # 3) SIGKILL while a checkpoint is being written (the write sleeps before its rename).
    proc = job.start(KUBETUNE_TEST_SLOW_SAVE_SECONDS="5")
    wait_for(
        lambda: any(job.ckpt.glob("checkpoints/.step-*.tmp-*")) or proc.poll() is not None,
        120,
        "a save in flight",
    )
    assert proc.poll() is None, job.log_text()
    proc.kill()
    proc.wait(timeout=30)
    lost_after_first_kill = job.progress()["lostStepsTotal"]
    assert 0 <= lost_after_first_kill <= EVERY and lost_after_first_kill <= before_kill

    # 4) SIGTERM again, then run to the end.
    proc = job.start()
    assert job.interrupt_at(proc, job.progress()["step"] + 1, signal.SIGTERM) == 143
    assert job.run() == 0, job.log_text()
    final = job.termination()
    assert final["reason"] == "Completed" and final["step"] == final["totalSteps"] == 16

    assert job.final_bytes() == ref.final_bytes()
    a, b = (
        load_file(str(ref.ckpt / "final/model.safetensors")),
        load_file(str(job.ckpt / "final/model.safetensors")),
    )
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert "removing partial checkpoint write" in job.log_text()
