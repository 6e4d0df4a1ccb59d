"""Two gloo processes under torchrun: SIGTERM on one rank stops both at the same step, and the resumed run
ends bitwise equal to an uninterrupted two-process run."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from .helpers import Job, tiny_spec, wait_for

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

SPEC = tiny_spec(training={"maxSteps": 10, "batchSize": 4}, checkpoint={"everySteps": 4})


def torchrun(job: Job) -> list[str]:
    """torchrun as the operator's pods run it: through kubetune_trainer.launch (its exit codes)."""
    return [
        sys.executable, "-m", "kubetune_trainer.launch", "--nproc_per_node", "2", "--master_port", "0",
        "--standalone", "-m", "kubetune_trainer", "-f", str(job.manifest), "--checkpoint-dir", str(job.ckpt),
    ]  # fmt: skip


def start(job: Job) -> subprocess.Popen[str]:
    log = open(job.root / "trainer.log", "a")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(torchrun(job), env=job.env(), stdout=log, stderr=subprocess.STDOUT, text=True)


def worker_pids(agent: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(agent)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


@pytest.mark.timeout(600)
def test_ddp_sigterm_on_one_rank_then_resume_is_bitwise_equal(job_factory: Callable[..., Job]) -> None:
    ref = job_factory(SPEC, "ddp-ref")
    assert start(ref).wait(timeout=300) == 0, ref.log_text()
    assert ref.termination()["reason"] == "Completed"

    job = job_factory(SPEC, "ddp")
    agent = start(job)
    wait_for(lambda: job.progress().get("step", 0) >= 3 or agent.poll() is not None, 240, "step 3")
    assert agent.poll() is None, job.log_text()
    workers = worker_pids(agent.pid)
    assert len(workers) == 2, workers
    import os

    os.kill(workers[-1], signal.SIGTERM)  # one rank only: the stop flag is all-reduced
    # Both workers checkpoint and exit 143; torchrun alone would exit 1, the launcher exits 143.
    assert agent.wait(timeout=120) == 143, job.log_text()
    rank0 = job.termination()
    rank1 = Job.termination_of(job.term_log.with_name(job.term_log.name + ".rank1"))
    assert rank0["reason"] == rank1["reason"] == "Preempted", job.log_text()
    assert rank0["step"] == rank1["step"] == rank0["checkpointStep"]

    assert start(job).wait(timeout=300) == 0, job.log_text()
    assert job.termination()["step"] == 10
    assert job.final_bytes() == ref.final_bytes()
