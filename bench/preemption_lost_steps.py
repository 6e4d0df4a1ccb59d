"""Steps lost to preemption, measured on real `kubetune-train` processes.

A run is stopped by SIGTERM (graceful: the trainer checkpoints the step it reached) and later by SIGKILL
(no warning: everything since the last periodic checkpoint is redone). Lost steps are what the trainer itself
reports on restart (progress.json: last step reached minus checkpoint step resumed from).
Keys: `sigterm_lost_steps` (target 0), `sigkill_lost_steps` (target <= `every_steps`), `every_steps`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

EVERY, TOTAL, TERM_AT, KILL_AFTER_CKPT = 10, 60, 17, 7
SPEC = {
    "model": {"name": "test_resnet"},
    "data": {"format": "synthetic", "imageSize": 32, "syntheticSamples": 256, "numWorkers": 0},
    "training": {"maxSteps": TOTAL, "batchSize": 16},
    "checkpoint": {"everySteps": EVERY},
    "metrics": {"port": 0},
}
TRAINER = Path(__file__).resolve().parents[1] / "trainer_image"


def _progress(ckpt: Path) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((ckpt / "progress.json").read_text())
        return doc
    except (OSError, ValueError):
        return {}


def _wait(cond: Any, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("trainer did not reach the expected step")
        time.sleep(0.01)


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest, ckpt, term = root / "job.yaml", root / "ckpt", root / "termination-log"
        manifest.write_text(
            yaml.safe_dump({"kind": "FineTuneJob", "metadata": {"name": "bench"}, "spec": SPEC})
        )
        env = {
            **os.environ,
            "PYTHONPATH": str(TRAINER),
            "OMP_NUM_THREADS": "1",
            "KUBETUNE_TERMINATION_LOG": str(term),
        }
        argv = [sys.executable, "-m", "kubetune_trainer", "-f", str(manifest), "--checkpoint-dir", str(ckpt)]

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        proc = start()
        _wait(lambda: _progress(ckpt).get("step", 0) >= TERM_AT)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
        sigterm_exit_seconds = time.perf_counter() - t0
        preempted = json.loads(term.read_text())

        proc = start()
        _wait(lambda: _progress(ckpt).get("step", 0) > preempted["step"])  # restarted and stepping
        after_term = _progress(ckpt)
        sigterm_lost = after_term["lostStepsTotal"]
        kill_at = (after_term["step"] // EVERY + 1) * EVERY + KILL_AFTER_CKPT
        _wait(lambda: _progress(ckpt).get("step", 0) >= kill_at)
        proc.kill()
        proc.wait(timeout=60)
        reached = _progress(ckpt)["step"]

        assert start().wait(timeout=300) == 0
        done = json.loads(term.read_text())
        sigkill_lost = _progress(ckpt)["lostStepsTotal"] - sigterm_lost
    return {
        "every_steps": EVERY,
        "total_steps": TOTAL,
        "sigterm_at_step": preempted["step"],
        "sigterm_checkpoint_step": preempted["checkpointStep"],
        "sigterm_lost_steps": sigterm_lost,
        "sigterm_to_exit_seconds": sigterm_exit_seconds,
        "sigkill_at_step": reached,
        "sigkill_lost_steps": sigkill_lost,
        "final_reason": done["reason"],
        "reported_lost_steps_total": done["lostSteps"],
    }


if __name__ == "__main__":
    print(run())
