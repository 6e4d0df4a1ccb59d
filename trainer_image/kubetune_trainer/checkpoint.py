"""Checkpoints: when to save, CPU snapshot, background atomic write, verification, fallback, retention.

Layout under <checkpoint-dir>/checkpoints/: `step-00000123.pt` (torch.save of the full training state) and
`step-00000123.json` (manifest with size and sha256, written last). A checkpoint counts only when its
manifest exists and the file matches it, so a write torn by SIGKILL or a full disk is skipped on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.config import CheckpointConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SLOW_SAVE_ENV = "KUBETUNE_TEST_SLOW_SAVE_SECONDS"
"""Test-only: sleep this long inside each write (before the rename) to open a window for SIGKILL."""


Deferred = Callable[[torch.Tensor], bool]


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is left intact."""


@dataclass(frozen=True)
class Found:
    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, doc: dict[str, Any], durable: bool = True) -> None:
    """Temp file in the same directory + os.replace; with durable, fsync the file and the directory too."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, sort_keys=True)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


class _HashingWriter:
    """File wrapper that hashes what torch.save writes, so the file is never read back to checksum it."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.sha.update(data)
        self.size += len(memoryview(data).cast("B"))
        return int(self.f.write(data))

    def flush(self) -> None:
        self.f.flush()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class Checkpointer:
    """Owns <root>/checkpoints. Only the writer (rank 0) touches the disk; every rank can read."""

    def __init__(self, root: Path, cfg: CheckpointConfig, writer: bool = True) -> None:
        self.root = root
        self.dir = root / "checkpoints"
        self.cfg = cfg
        self.writer = writer
        self.last_save_time = time.monotonic()
        self.last_saved_step = -1
        self.save_seconds: list[float] = []
        self.blocked_seconds: list[float] = []
        self._completed: list[tuple[int, float, Path]] = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._late: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._copied: threading.Event | None = None
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.remove_temp_files()

    # -- policy ------------------------------------------------------------------------------------
    def should_save(self, step: int, now: float | None = None) -> bool:
        """True every `everySteps` steps or after `everySeconds` seconds since the last save."""
        if step == self.last_saved_step:
            return False
        if self.cfg.everySteps and step % self.cfg.everySteps == 0:
            return True
        now = time.monotonic() if now is None else now
        return bool(self.cfg.everySeconds) and now - self.last_save_time >= self.cfg.everySeconds

    # -- saving ------------------------------------------------------------------------------------
    def snapshot(self, state: Any, deferred: Deferred | None = None, _key: str = "") -> Any:
        """Copy every tensor into CPU buffers the training thread will not touch again (reused between saves:
        at most one save is in flight, and it has finished before the next snapshot). Tensors for which
        `deferred(t)` is true get a buffer now but are copied later by the writer thread (see save_async)."""
        if isinstance(state, torch.Tensor):
            t = state.detach()
            buf = self._buffers.get(_key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
                self._buffers[_key] = buf
            if deferred is not None and deferred(t):
                self._late.append((t, buf))
            else:
                buf.copy_(t, non_blocking=t.is_cuda)
            return buf
        if isinstance(state, dict):
            return {k: self.snapshot(v, deferred, f"{_key}/{k}") for k, v in state.items()}
        if isinstance(state, list | tuple):
            items = [self.snapshot(v, deferred, f"{_key}/{i}") for i, v in enumerate(state)]
            return items if isinstance(state, list) else tuple(items)
        return state  # ints, floats, strings, RNG tuples and numpy arrays are immutable or fresh copies

    def save_async(self, step: int, state: dict[str, Any], deferred: Deferred | None = None) -> float:
        """Snapshot and write in a background thread; returns seconds the caller was blocked so far.

        `deferred` marks tensors that stay unchanged until the next optimizer step (parameters, optimizer
        and EMA state): the writer thread copies those while the next forward/backward runs, and the caller
        must call wait_copied() before mutating them (the trainer does it in an optimizer step pre-hook).
        Everything else (BatchNorm running stats change in forward) is copied before this returns."""
        if not self.writer:
            self._mark(step)  # every rank keeps the same policy state, so all take the same branches
            return 0.0
        t0 = time.perf_counter()
        self.wait()
        self._late = []
        snap = self.snapshot(state, deferred)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._mark(step)
        late, self._late = self._late, []
        self._copied = threading.Event()
        self._thread = threading.Thread(
            target=self._write_guarded, args=(step, snap, late), name="checkpoint-writer", daemon=True
        )
        self._thread.start()
        blocked = time.perf_counter() - t0
        self.blocked_seconds.append(blocked)
        return blocked

    def wait_copied(self) -> None:
        """Block until the writer thread has copied the deferred tensors of the save in flight."""
        event = self._copied
        if event is not None and not event.is_set():
            t0 = time.perf_counter()
            event.wait()
            self.blocked_seconds[-1] += time.perf_counter() - t0

    def save_sync(self, step: int, state: dict[str, Any]) -> Path | None:
        """Write now (SIGTERM, end of training); raises CheckpointError if the write fails."""
        if not self.writer:
            self._mark(step)
            return None
        self.wait()
        self._mark(step)
        return self._write(step, self.snapshot(state))

    def wait(self) -> None:
        """Block until the in-flight save is done; re-raise its error in the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def drain_completed(self) -> list[tuple[int, float, Path]]:
        """(step, write seconds, path) of saves that became durable since the last call."""
        done, self._completed = self._completed, []
        return done

    def _mark(self, step: int) -> None:
        self.last_saved_step = step
        self.last_save_time = time.monotonic()

    def _write_guarded(
        self, step: int, snap: dict[str, Any], late: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        try:
            try:
                for src, buf in late:
                    buf.copy_(src)
            finally:
                if self._copied is not None:
                    self._copied.set()
            self._write(step, snap)
        except BaseException as e:  # surfaced by wait() in the training thread
            self._error = e

    def path_for(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}.pt"

    def _write(self, step: int, snap: dict[str, Any]) -> Path:
        t0 = time.perf_counter()
        final = self.path_for(step)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                w = _HashingWriter(f)
                torch.save(snap, w)  # type: ignore[arg-type]
                f.flush()
                slow = float(os.environ.get(SLOW_SAVE_ENV) or 0)
                if slow:
                    time.sleep(slow)
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.dir)
            manifest = {
                "format": FORMAT_VERSION,
                "step": step,
                "epoch": snap.get("epoch"),
                "file": final.name,
                "bytes": w.size,
                "sha256": w.sha.hexdigest(),
                "time": time.time(),
            }
            write_json_atomic(final.with_suffix(".json"), manifest)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            prev = self.find_latest_valid(quiet=True)
            keep = (
                f"the previous checkpoint {prev.path} is intact" if prev else "no earlier checkpoint exists"
            )
            raise CheckpointError(f"checkpoint write to {self.dir} failed at step {step}: {e}; {keep}") from e
        seconds = time.perf_counter() - t0
        self.save_seconds.append(seconds)
        self._completed.append((step, seconds, final))  # list.append is atomic under the GIL
        log.info("checkpoint step %d written in %.3fs (%d bytes)", step, seconds, w.size)
        self.keep_latest_k()
        return final

    # -- reading -----------------------------------------------------------------------------------
    def verify(self, manifest_path: Path) -> tuple[dict[str, Any] | None, str]:
        """(manifest, "") when the checkpoint is whole, else (None, why not)."""
        try:
            manifest = json.loads(manifest_path.read_text())
            path = self.dir / manifest["file"]
            if not path.is_file():
                return None, f"{path.name} is missing"
            size = path.stat().st_size
            if size != manifest["bytes"]:
                return None, f"{path.name} has {size} bytes, manifest says {manifest['bytes']}"
            if sha256_file(path) != manifest["sha256"]:
                return None, f"{path.name} does not match its sha256"
            return manifest, ""
        except (OSError, ValueError, KeyError, TypeError) as e:
            return None, f"unreadable manifest: {e}"

    def find_latest_valid(self, quiet: bool = False) -> Found | None:
        """Newest checkpoint that verifies; torn or corrupt ones are logged and skipped."""
        if not self.dir.is_dir():
            return None
        for manifest_path in sorted(self.dir.glob("step-*.json"), reverse=True):
            manifest, why = self.verify(manifest_path)
            if manifest is not None:
                return Found(self.dir / manifest["file"], manifest)
            if not quiet:
                log.warning("skipping checkpoint %s: %s", manifest_path.name, why)
        return None

    def load(self, found: Found) -> dict[str, Any]:
        # weights_only=False: the state holds RNG states and numpy arrays; the file is our own and verified.
        state: dict[str, Any] = torch.load(found.path, map_location="cpu", weights_only=False)
        return state

    # -- retention ---------------------------------------------------------------------------------
    def keep_latest_k(self) -> None:
        """Delete all but the newest keepLast checkpoints (manifest first, so a half-deleted one is invalid).
        Only step-* files in checkpoints/ are candidates: best/, final/ and eval/ beside it are never touched."""
        manifests = sorted(self.dir.glob("step-*.json"), reverse=True)
        for old in manifests[self.cfg.keepLast :]:
            old.unlink(missing_ok=True)
            old.with_suffix(".pt").unlink(missing_ok=True)
        # A .pt renamed into place whose manifest never got written (killed in between) is garbage once older
        # than the newest manifest.
        if manifests:
            newest = manifests[0].with_suffix(".pt").name
            for pt in self.dir.glob("step-*.pt"):
                if pt.name < newest and not pt.with_suffix(".json").exists():
                    pt.unlink(missing_ok=True)

    def remove_temp_files(self) -> None:
        for tmp in self.dir.glob(".step-*.tmp-*"):
            log.warning("removing partial checkpoint write %s", tmp.name)
            tmp.unlink(missing_ok=True)


class ProgressFile:
    """progress.json: the latest step reached, rewritten after every step, so a restart knows how much work
    an unannounced kill cost. The first write of a process replaces the file atomically; later ones are a
    single pwrite of a fixed-size, space-padded document at offset 0 (microseconds; a killed process cannot
    tear one write). Not fsynced: only a node crash can lose the page cache, and then lost steps are
    under-reported, never the checkpoint."""

    SIZE = 1024

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.path.read_text())
            return doc
        except (OSError, ValueError):
            return {}

    def write(self, doc: dict[str, Any]) -> None:
        data = json.dumps(doc, sort_keys=True).encode()
        if len(data) >= self.SIZE:
            raise ValueError(f"progress document too large ({len(data)} bytes)")
        data = data.ljust(self.SIZE - 1) + b"\n"
        if self._fd is None:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
            self._fd = os.open(self.path, os.O_WRONLY)
        else:
            os.pwrite(self._fd, data, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
