"""Helpers for trainer tests: write a spec, start `kubetune-train` as a subprocess, wait on conditions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "kubetune_trainer"]


def tiny_spec(**sections: dict[str, Any]) -> dict[str, Any]:
    """A seconds-long job: test_resnet on 32x32 synthetic data, no metrics server."""
    spec: dict[str, Any] = {
        "model": {"name": "test_resnet"},
        "data": {"format": "synthetic", "imageSize": 32, "syntheticSamples": 96, "numWorkers": 0},
        "training": {"maxSteps": 12, "batchSize": 8},
        "checkpoint": {"everySteps": 4},
        "metrics": {"port": 0},
    }
    for name, values in sections.items():
        spec.setdefault(name, {}).update(values)
    return spec


def trainer_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",  # the CI box is shared; one thread is faster and steadier here
        PYTHONPATH=str(REPO / "trainer_image"),
        WANDB_MODE=env.get("WANDB_MODE", "disabled"),
        WANDB_SILENT="true",
    )
    env.pop("KUBETUNE_CHECKPOINT_DIR", None)
    env.update(extra)
    return env


class Job:
    """One FineTuneJob directory: manifest + checkpoint dir + termination log, runnable many times."""

    def __init__(self, root: Path, spec: dict[str, Any], name: str = "job") -> None:
        self.root = root
        self.ckpt = root / "ckpt"
        self.manifest = root / f"{name}.yaml"
        self.term_log = root / "termination-log"
        self.write(spec, name)

    def write(self, spec: dict[str, Any], name: str = "job") -> None:
        doc = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.manifest.write_text(yaml.safe_dump(doc))

    def argv(self, *extra: str) -> list[str]:
        return [*TRAIN, "-f", str(self.manifest), "--checkpoint-dir", str(self.ckpt), *extra]

    def env(self, **extra: str) -> dict[str, str]:
        return trainer_env(KUBETUNE_TERMINATION_LOG=str(self.term_log), **extra)

    def start(self, *extra: str, **env: str) -> subprocess.Popen[str]:
        self.term_log.unlink(missing_ok=True)
        log = open(self.root / "trainer.log", "a")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            self.argv(*extra), env=self.env(**env), stdout=log, stderr=subprocess.STDOUT, text=True
        )

    def run(self, *extra: str, timeout: float = 240, **env: str) -> int:
        proc = self.start(*extra, **env)
        return proc.wait(timeout=timeout)

    def progress(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.ckpt / "progress.json").read_text())
            return doc
        except (OSError, ValueError):
            return {}

    def termination(self) -> dict[str, Any]:
        return self.termination_of(self.term_log)

    @staticmethod
    def termination_of(path: Path) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(path.read_text())
        return doc

    def log_text(self) -> str:
        return (self.root / "trainer.log").read_text()

    def final_bytes(self) -> bytes:
        return (self.ckpt / "final" / "model.safetensors").read_bytes()

    def interrupt_at(
        self, proc: subprocess.Popen[str], step: int, sig: signal.Signals, timeout: float = 120
    ) -> int:
        """Send `sig` once the run reached `step` (or later); return its exit code."""
        wait_for(
            lambda: self.progress().get("step", 0) >= step or proc.poll() is not None, timeout, f"step {step}"
        )
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=timeout)


def wait_for(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def write_digits(root: Path, digits: range = range(10)) -> Path:
    """scikit-learn's 8x8 digits as an ImageFolder of PNGs (see kubetune_trainer.digits)."""
    from kubetune_trainer.digits import write_digits as write

    return write(root, digits)
