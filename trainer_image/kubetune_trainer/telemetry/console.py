"""Progress a person can read: a live bar on a terminal, one plain line every N seconds in pod logs.

The training thread only stores the latest values (a few attribute writes per step); a daemon thread
formats and prints them, so printing never sits on the hot path.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from kubetune_trainer.telemetry import RunInfo, Telemetry


def eta_text(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def progress_line(state: dict[str, Any]) -> str:
    """`step 40/120 (33%) | epoch 1.33 | loss 0.8123 | lr 9.5e-04 | 512 samples/s | ETA 0:12 | ckpt 32`."""
    step, total = state["step"], max(1, state["total"])
    parts = [f"step {step}/{total} ({100 * step // total}%)", f"epoch {state['epoch']:.2f}"]
    if state.get("loss") is not None:
        parts.append(f"loss {state['loss']:.4f}")
    if state.get("lr") is not None:
        parts.append(f"lr {state['lr']:.2e}")
    if state.get("rate"):
        parts.append(f"{state['rate']:.0f} samples/s")
    parts.append(f"ETA {eta_text(state.get('eta'))}")
    ckpt = state.get("checkpoint")
    parts.append(f"ckpt {ckpt if ckpt is not None else '-'}")
    if state.get("top1") is not None:
        parts.append(f"val top-1 {state['top1']:.4f}")
    return " | ".join(parts)


class ConsoleTelemetry(Telemetry):
    """Prints progress_line() every `every_seconds` (plain) or refreshes a rich bar when `out` is a TTY."""

    def __init__(self, every_seconds: float, out: TextIO | None = None) -> None:
        self.every = every_seconds
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.state: dict[str, Any] = {"step": 0, "total": 1, "epoch": 0.0}
        self._rate_window: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples_per_step = 0.0
        self._printed_step = -1

    def start(self, info: RunInfo) -> None:
        self.state.update(step=info.start_step, total=info.total_steps)
        self.state["checkpoint"] = info.extra.get("checkpoint_step") or None
        self._t0, self._s0 = time.monotonic(), info.start_step
        target = self._bar if self.tty else self._lines
        self._thread = threading.Thread(target=target, name="kubetune-progress", daemon=True)
        self._thread.start()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        st = self.state
        st["step"], st["loss"], st["lr"] = step, metrics.get("loss"), metrics.get("learning_rate")
        st["epoch"] = metrics.get("epoch", st["epoch"])
        self._samples_per_step = metrics.get("samples", self._samples_per_step)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.state["top1"] = metrics.get("eval_top1")

    def checkpoint_saved(self, step: int, seconds: float) -> None:
        self.state["checkpoint"] = step

    def _snapshot(self) -> dict[str, Any]:
        st = dict(self.state)
        elapsed, done = time.monotonic() - self._t0, st["step"] - self._s0
        per_step = elapsed / done if done > 0 else None
        st["rate"] = self._samples_per_step / per_step if per_step else None
        st["eta"] = per_step * (st["total"] - st["step"]) if per_step else None
        return st

    def _lines(self) -> None:
        while not self._done.wait(self.every):
            self._print_line()

    def _print_line(self) -> None:
        st = self._snapshot()
        if st["step"] != self._printed_step:
            self._printed_step = st["step"]
            print(progress_line(st), file=self.out, flush=True)

    def _bar(self) -> None:
        try:
            from rich.progress import BarColumn, Progress, TextColumn
        except ImportError:  # rich is a dev dependency; without it a terminal gets the plain lines
            self._lines()
            return
        with Progress(
            TextColumn("[bold]train"), BarColumn(), TextColumn("{task.description}"), transient=False
        ) as bar:
            task = bar.add_task("", total=self.state["total"])
            while not self._done.wait(min(self.every, 0.5)):
                st = self._snapshot()
                bar.update(task, completed=st["step"], total=st["total"], description=progress_line(st))
            st = self._snapshot()
            bar.update(task, completed=st["step"], total=st["total"], description=progress_line(st))

    def finish(self, exit_code: int) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            if not self.tty:
                self._print_line()  # the last state, so the log ends with where the run got to
