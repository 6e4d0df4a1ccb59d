"""Exact resume with timm's whole fine-tuning recipe on: random augmentation (RandAugment, random resized
crop, random erasing), mixup/cutmix, a timm optimizer and scheduler, EMA, step evaluations, the best
checkpoint and 2 loader workers. SIGTERM + SIGKILL + SIGTERM at random moments, and a 2-process DDP run with
one rank SIGTERMed, each end with weights byte-equal to an uninterrupted run of the same spec."""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .helpers import Job, wait_for, write_digits
from .test_ddp import start as start_ddp
from .test_ddp import worker_pids

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

EVERY = 3


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "digits", range(4))


def recipe(path: Path, steps: int) -> dict[str, Any]:
    return {
        "model": {"name": "test_resnet"},
        "data": {
            "format": "imagefolder",
            "path": str(path),
            "imageSize": 32,
            "numWorkers": 2,
            "valFraction": 0.2,
            "augment": {
                "autoAugment": "rand-m9-mstd0.5-inc1",
                "scale": [0.6, 1.0],
                "hflip": 0.0,
                "reprob": 0.25,
            },
            "sampling": "balanced",
        },
        "training": {
            "maxSteps": steps,
            "batchSize": 8,
            "gradAccumulation": 2,
            "optimizer": "lamb",
            "scheduler": "cosine",
            "warmupSteps": 2,
            "minLearningRate": 1e-5,
            "labelSmoothing": 0.1,
            "mixup": {"mixupAlpha": 0.8, "cutmixAlpha": 1.0, "switchProb": 0.5},
            "ema": True,
            "emaDecay": 0.99,
        },
        "evaluation": {"everySteps": 5},
        "checkpoint": {"everySteps": EVERY, "best": {"metric": "top1"}},
        "metrics": {"port": 0},
    }


@pytest.mark.timeout(900)
def test_recipe_interrupted_run_is_bitwise_equal(digits: Path, job_factory: Callable[..., Job]) -> None:
    spec = recipe(digits, 14)
    ref = job_factory(spec, "recipe-ref")
    assert ref.run(timeout=400) == 0, ref.log_text()
    assert ref.termination()["reason"] == "Completed"

    job = job_factory(spec, "recipe")
    rng = random.Random(7)
    proc = job.start()
    assert job.interrupt_at(proc, rng.randint(2, 5), signal.SIGTERM) == 143, job.log_text()
    term = job.termination()
    assert term["reason"] == "Preempted" and term["lostSteps"] == 0

    proc = job.start()
    assert job.interrupt_at(proc, term["step"] + rng.randint(2, 4), signal.SIGKILL) == -signal.SIGKILL

    proc = job.start()
    assert job.interrupt_at(proc, job.progress()["step"] + 1, signal.SIGTERM) == 143, job.log_text()
    assert job.run(timeout=400) == 0, job.log_text()
    assert job.termination()["step"] == 14

    assert job.final_bytes() == ref.final_bytes()
    best = "best/model.safetensors"
    assert (job.ckpt / best).read_bytes() == (ref.ckpt / best).read_bytes()
    # The eval reports of the interrupted run are the uninterrupted run's (the same samples, same weights).
    reports = sorted((ref.ckpt / "eval").glob("step-*.json"))
    assert [r.name for r in reports] == [r.name for r in sorted((job.ckpt / "eval").glob("step-*.json"))]
    assert len(reports) >= 3, reports  # everySteps 5 over 14 steps, epoch ends and the last step
    for report in reports:
        assert (job.ckpt / "eval" / report.name).read_text() == report.read_text(), report.name


@pytest.mark.timeout(900)
def test_recipe_ddp_sigterm_on_one_rank_is_bitwise_equal(
    digits: Path, job_factory: Callable[..., Job]
) -> None:
    spec = recipe(digits, 8)
    ref = job_factory(spec, "recipe-ddp-ref")
    assert start_ddp(ref).wait(timeout=400) == 0, ref.log_text()

    job = job_factory(spec, "recipe-ddp")
    agent = start_ddp(job)
    wait_for(lambda: job.progress().get("step", 0) >= 3 or agent.poll() is not None, 300, "step 3")
    assert agent.poll() is None, job.log_text()
    workers = worker_pids(agent.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGTERM)
    agent.wait(timeout=180)
    assert job.termination()["reason"] == "Preempted", job.log_text()

    assert start_ddp(job).wait(timeout=400) == 0, job.log_text()
    assert job.termination()["step"] == 8
    assert job.final_bytes() == ref.final_bytes()
