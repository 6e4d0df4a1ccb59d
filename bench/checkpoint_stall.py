"""How long the training thread is blocked per checkpoint, against a synchronous torch.save of the same state.

State: timm resnet18 (no pretrained weights) + AdamW moments + RNG states, as the trainer saves it.
Key `stall_ratio` = mean training-thread seconds blocked per async save / mean seconds of torch.save of that
state to the same directory (target <= 0.10). Blocked time counts: waiting for a previous write, copying
the tensors that change during forward (BatchNorm statistics) and RNG state, and any wait in the optimizer
pre-hook for the writer thread to finish copying parameters and optimizer state (it copies them while the
next forward/backward runs). `stall_ratio_vs_fsync` compares with a durable torch.save (+ fsync).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL, SAVES, STEPS_BETWEEN, SYNC_REPEATS = "resnet18", 5, 5, 3


def run() -> dict[str, Any]:
    import timm
    import torch

    from kubetune_trainer.checkpoint import Checkpointer
    from kubetune_trainer.config import CheckpointConfig
    from kubetune_trainer.runtime import rng_state

    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=1000).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 1000, (16,))

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def state(step: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "epoch": 0,
            "rng": rng_state(),
        }

    train_step()
    with tempfile.TemporaryDirectory(dir=os.environ.get("KUBETUNE_BENCH_DIR")) as tmp:
        sync_s, sync_fsync_s = [], []
        for i in range(SYNC_REPEATS):
            t0 = time.perf_counter()
            torch.save(state(0), Path(tmp) / f"sync{i}.pt")
            sync_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with open(Path(tmp) / f"syncf{i}.pt", "wb") as f:
                torch.save(state(0), f)
                f.flush()
                os.fsync(f.fileno())
            sync_fsync_s.append(time.perf_counter() - t0)
        size = (Path(tmp) / "sync0.pt").stat().st_size
        ckpt = Checkpointer(Path(tmp) / "async", CheckpointConfig(everySteps=STEPS_BETWEEN, keepLast=2))
        opt.register_step_pre_hook(lambda *_: ckpt.wait_copied())  # as the trainer does

        def deferred() -> Callable[[torch.Tensor], bool]:
            ptrs = {p.data_ptr() for p in model.parameters()}
            ptrs |= {v.data_ptr() for st in opt.state.values() for v in st.values() if torch.is_tensor(v)}
            return lambda t: t.data_ptr() in ptrs

        step = 0
        for _ in range(SAVES):
            for _ in range(STEPS_BETWEEN):
                train_step()
                step += 1
            ckpt.save_async(step, state(step), deferred())
        ckpt.wait()
    blocked = statistics.mean(ckpt.blocked_seconds)
    sync = statistics.mean(sync_s)
    return {
        "model": MODEL,
        "state_bytes": size,
        "saves": SAVES,
        "sync_torch_save_seconds": sync,
        "sync_torch_save_fsync_seconds": statistics.mean(sync_fsync_s),
        "async_blocked_seconds": blocked,
        "async_blocked_max_seconds": max(ckpt.blocked_seconds),
        "async_write_seconds": statistics.mean(ckpt.save_seconds),
        "stall_ratio": blocked / sync,
        "stall_ratio_vs_fsync": blocked / statistics.mean(sync_fsync_s),
        "target": "<= 0.10",
    }


if __name__ == "__main__":
    print(run())
