"""TensorBoard: one record per job in `<checkpoint dir>/tensorboard/`, unbroken across preemptions.

Every attempt appends its own event file to the same directory (one TensorBoard run). An attempt that
resumes from the checkpoint at step N opens its writer with purge_step=N+1: TensorBoard then drops what an
earlier attempt logged after step N (steps it trained again or never checkpointed), so each curve has one
point per step, none twice and none going backwards. An attempt that starts at step 0 purges everything.

Per step the training thread only appends (step, time, metrics) to a list: handing each event to
SummaryWriter's queue costs ~30-80 us of thread wake-ups, so a daemon thread does that every
DRAIN_SECONDS, and flush() (before every checkpoint, on SIGTERM) does it at once. Histograms, images and
the graph are made at evaluations and at the first start only.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from kubetune_trainer.config import RESUME_CRITICAL
from kubetune_trainer.evaluate import Misclassified
from kubetune_trainer.telemetry import ModelView, RunInfo, Telemetry

log = logging.getLogger(__name__)

STEP_TAGS = {
    "loss": "train/loss",
    "learning_rate": "train/lr",
    "samples_per_second": "train/samples_per_second",
    "grad_norm": "train/grad_norm",
}
EVAL_TAGS = {
    "eval_top1": "eval/top1",
    "eval_top5": "eval/top5",
    "eval_loss": "eval/loss",
    "eval_best_top1": "eval/best_top1",
    "eval_best_metric": "eval/best_metric",
}
HPARAM_METRICS = ("eval/top1", "eval/top5", "eval/loss", "eval/best_top1", "train/loss")
GRID_IMAGES = 16
OTHER_TENSORS = 4
"""Trainable tensors besides the classifier whose weights and gradients get histograms."""
MAX_CLOCK_WAIT = 5.0
DRAIN_SECONDS = 1.0


class TensorBoardTelemetry(Telemetry):
    """SummaryWriter on `log_dir`; any error in it turns TensorBoard off for the attempt, never training."""

    def __init__(self, log_dir: Path) -> None:
        self.dir = log_dir
        self.writer: SummaryWriter | None = None
        self._fw: Any = None
        self.info: RunInfo | None = None
        self._fresh = False
        self._step_tags: list[tuple[str, str]] | None = None
        self._watched: list[tuple[str, nn.Parameter]] = []
        self._view: ModelView | None = None
        self._last: dict[str, float] = {}
        self._pending: deque[tuple[int, float, dict[str, float]]] = deque()  # appends/pops thread-safe
        self._drain_lock = threading.Lock()
        self._stop = threading.Event()
        self._drainer: threading.Thread | None = None

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:
            log.warning("TensorBoard off for this attempt (%s failed: %s: %s)", what, type(e).__name__, e)
            writer, self.writer = self.writer, None
            self._stop.set()
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()

    # -- start ---------------------------------------------------------------------------------------
    def start(self, info: RunInfo) -> None:
        self.info = info
        with self._guard("start"):
            self.dir.mkdir(parents=True, exist_ok=True)
            existing = event_files(self.dir)
            wait_past(existing)
            # From scratch: drop everything an earlier attempt wrote (it had no checkpoint to continue).
            purge = info.start_step + 1 if info.start_step else 0
            self.writer = SummaryWriter(str(self.dir), purge_step=purge, flush_secs=10)
            self._fw = self.writer.file_writer  # its events file; summaries go straight to it
            self._drainer = threading.Thread(
                target=self._drain_loop, name="kubetune-tensorboard", daemon=True
            )
            self._drainer.start()
            self._fresh = info.start_step == 0 or not existing
            if self._fresh:
                self.writer.add_text("job/spec", spec_markdown(info.spec), 0)
                if self._view is not None:
                    self._add_graph(self._view)
            log.info(
                "TensorBoard: %s, %s",
                self.dir,
                f"continuing after step {info.start_step} (what earlier attempts logged after it is dropped)"
                if info.start_step
                else "from step 0",
            )

    def watch(self, view: ModelView) -> None:
        self._view = view
        self._watched = pick_tensors(view.model)

    def _add_graph(self, view: ModelView) -> None:
        """The graph, traced on a copy in eval mode (tracing runs a forward pass: BatchNorm statistics and
        the RNG of the real model must not move, or the run would differ from one without TensorBoard)."""
        assert self.writer is not None
        try:
            model = view.model
            device = next(model.parameters()).device
            example = torch.zeros(1, 3, view.image_size, view.image_size, device=device)
            devices = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                self.writer.add_graph(copy.deepcopy(model).eval(), example)
        except Exception as e:
            log.info("TensorBoard: model graph skipped (tracing failed: %s: %s)", type(e).__name__, e)

    # -- per step: a list append; the Summary is built off the training thread --------------------
    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            self._pending.append((step, time.time(), metrics))  # the loop hands a fresh dict each step

    def _drain_loop(self) -> None:
        while not self._stop.wait(DRAIN_SECONDS):
            with self._guard("writing steps"):
                self._drain()

    def _drain(self) -> None:
        """One Summary per logged step (train/* tags), in step order, to the writer's queue."""
        with self._drain_lock:
            while self._pending and self.writer is not None:
                step, wall, m = self._pending.popleft()
                if self._step_tags is None:
                    self._step_tags = step_tags(m)
                values = [Summary.Value(tag=t, simple_value=m[k]) for k, t in self._step_tags if k in m]
                self._fw.add_summary(Summary(value=values), step, wall)
                self._last["train/loss"] = m["loss"]

    # -- per evaluation ------------------------------------------------------------------------------
    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        with self._guard("log_eval"):
            for key, tag in EVAL_TAGS.items():
                if key in metrics:
                    self.writer.add_scalar(tag, metrics[key], step)
                    self._last[tag] = metrics[key]
            for name, p in self._watched:
                self.writer.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)
                if p.grad is not None:  # the last update's; none right after a resume
                    self.writer.add_histogram(f"gradients/{name}", p.grad.detach().float().cpu(), step)

    @property
    def eval_samples_wanted(self) -> int:
        return GRID_IMAGES if self.writer is not None else 0

    def log_eval_samples(self, step: int, samples: Misclassified) -> None:
        picked = samples.samples()
        if self.writer is None or self._view is None or not picked:
            return
        with self._guard("log_eval_samples"):
            view = self._view
            names = [label(view.classes, s.predicted) for s in picked]
            truth = [label(view.classes, s.target) for s in picked]
            grid = misclassified_grid([s.image for s in picked], names, truth, view.eval_cfg)
            self.writer.add_image("eval/misclassified", grid, step, dataformats="HWC")
            rows = "\n".join(
                f"| {i + 1} | {p} | {t} |" for i, (p, t) in enumerate(zip(names, truth, strict=True))
            )
            self.writer.add_text(
                "eval/misclassified_labels", f"| # | predicted | true |\n|---|---|---|\n{rows}", step
            )

    # -- durability ----------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writer is not None:
            with self._guard("flush"):
                self._drain()
                self.writer.flush()

    def preempting(self) -> None:
        self.flush()

    def finish(self, exit_code: int) -> None:
        if self.writer is None:
            return
        self._stop.set()
        if self._drainer is not None:
            self._drainer.join(timeout=5)
        if self.writer is None:  # the drain thread hit an error (and logged it)
            return
        with self._guard("finish"):
            self._drain()
            if exit_code == 0 and self.info is not None:
                self._add_hparams(self.info)
            self.writer.close()
        self.writer = None

    def _add_hparams(self, info: RunInfo) -> None:
        """The run-defining fields and the final metrics, in this run's own directory (add_hparams() would
        make a sub-run per call): one hparams record per job, at its last step. The metric values the
        hparams dashboard shows are the last points of the scalar tags it names."""
        assert self.writer is not None
        metrics = {tag: self._last.get(tag, math.nan) for tag in HPARAM_METRICS}
        for summary in hparams(run_hparams(info.spec), metrics):
            self._fw.add_summary(summary, info.total_steps)


# -- pure helpers ------------------------------------------------------------------------------------
def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


def wait_past(existing: list[Path]) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with its creation second: a
    restart within the second of the last file (with a lower pid) would sort before it. Waits for the next
    second (at most MAX_CLOCK_WAIT: a node clock far behind the last one is logged, not waited out)."""
    parts = [p.name.split(".") for p in existing]
    newest = max((int(n[3]) for n in parts if len(n) > 3 and n[3].isdigit()), default=0)
    deadline = time.monotonic() + MAX_CLOCK_WAIT
    while int(time.time()) <= newest:
        if time.monotonic() > deadline:
            log.warning("TensorBoard: this node's clock is behind the last event file's; curves may misorder")
            return
        time.sleep(0.05)


def step_tags(metrics: dict[str, float]) -> list[tuple[str, str]]:
    """(metrics key, tag) pairs: the learning rate per parameter group when log_step reports several."""
    tags = list(STEP_TAGS.items())
    groups = sorted((k for k in metrics if k.startswith("learning_rate/group")), key=lambda k: int(k[19:]))
    if groups:
        tags = [(k, t) for k, t in tags if k != "learning_rate"]
        tags += [(k, "train/lr/" + k.removeprefix("learning_rate/")) for k in groups]
    return tags


def pick_tensors(model: nn.Module, others: int = OTHER_TENSORS) -> list[tuple[str, nn.Parameter]]:
    """The classifier's trainable tensors plus `others` weight matrices/kernels spread evenly through the
    rest of the model: a bounded set, whatever the model's size."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    get = getattr(model, "get_classifier", None)
    heads = get() if callable(get) else ()
    heads = heads if isinstance(heads, tuple | list) else (heads,)
    head_ids = {id(p) for h in heads if isinstance(h, nn.Module) for p in h.parameters()}
    head = [(n, p) for n, p in named if id(p) in head_ids]
    rest = [(n, p) for n, p in named if id(p) not in head_ids and p.ndim > 1]
    if len(rest) > others:
        rest = [rest[round(i * (len(rest) - 1) / max(1, others - 1))] for i in range(others)]
    return head + rest


def label(classes: list[str], index: int) -> str:
    return classes[index] if 0 <= index < len(classes) else str(index)


def spec_markdown(spec: dict[str, Any]) -> str:
    """The spec as a code block (indented: TensorBoard renders text as Markdown)."""
    text = yaml.safe_dump(spec, sort_keys=False, default_flow_style=False)
    return "\n".join("    " + line for line in text.splitlines())


def run_hparams(spec: dict[str, Any]) -> dict[str, float | int | str]:
    """RESUME_CRITICAL field paths -> their values in `spec` (unset ones left out; booleans and lists as
    text, since TensorBoard would show a boolean as 0/1)."""
    out: dict[str, float | int | str] = {}
    for path in RESUME_CRITICAL:
        node: Any = spec
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            continue
        if isinstance(node, bool):
            out[path] = str(node).lower()
        elif isinstance(node, int | float | str):
            out[path] = node
        else:
            out[path] = yaml.safe_dump(node, default_flow_style=True).strip()
    return out


def misclassified_grid(
    images: list[torch.Tensor], predicted: list[str], target: list[str], eval_cfg: dict[str, Any]
) -> Any:
    """An HWC uint8 grid (up to 4 columns) of the images as a person sees them (the eval transform's
    normalisation undone), each tile upscaled to >= 96 px with `pred <name>` / `true <name>` under it."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    mean = torch.tensor(eval_cfg.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32)[:, None, None]
    std = torch.tensor(eval_cfg.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32)[:, None, None]
    font = ImageFont.load_default()
    tiles = []
    for x, p, t in zip(images, predicted, target, strict=True):
        x = x if x.shape[0] == 3 else x[:1].expand(3, -1, -1)
        rgb = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        img = Image.fromarray(rgb)
        scale = max(1, math.ceil(96 / max(img.size)))
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        if max(img.size) > 192:
            img.thumbnail((192, 192))
        tile = Image.new("RGB", (max(img.width, 96), img.height + 26), (32, 32, 32))
        tile.paste(img, (0, 0))
        draw = ImageDraw.Draw(tile)
        chars = max(4, tile.width // 6)
        draw.text((2, img.height + 1), f"pred {p}"[:chars], fill=(255, 110, 110), font=font)
        draw.text((2, img.height + 13), f"true {t}"[:chars], fill=(140, 230, 140), font=font)
        tiles.append(tile)
    cols = min(4, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * (w + 2) + 2, rows * (h + 2) + 2), (0, 0, 0))
    for i, tile in enumerate(tiles):
        grid.paste(tile, (2 + (i % cols) * (w + 2), 2 + (i // cols) * (h + 2)))
    return np.asarray(grid)
