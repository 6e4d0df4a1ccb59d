"""Where the trainer runs: rank and world from torchrun's environment, the device, the process group, and
the global RNG state that a checkpoint must carry for an exact resume."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    """Where the process runs: rank, world, device, labels from the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    job: str = "local"
    namespace: str = "default"
    run_id: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_runtime() -> Runtime:
    """Rank/world from torchrun's environment; joins the process group (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
        torch.cuda.set_device(local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Runtime(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        device=f"cuda:{local_rank}" if cuda else "cpu",
        job=os.environ.get("KUBETUNE_JOB", "local"),
        namespace=os.environ.get("KUBETUNE_NAMESPACE", "default"),
        run_id=os.environ.get("KUBETUNE_RUN_ID") or None,
    )


def shutdown_runtime(rt: Runtime | None) -> None:
    if rt is not None and rt.distributed and dist.is_initialized():
        dist.destroy_process_group()
