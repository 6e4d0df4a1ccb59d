"""kubetune next to timm's own checkpoint/resume semantics, on the same model, data and batch size.

timm's train.py is not in the pip package, so this reproduces what it does with the same timm utilities:
`timm.utils.CheckpointSaver.save_checkpoint` at each epoch end (last.pth.tar; model, optimizer, epoch) and, on
restart, `timm.models.resume_checkpoint` then continue at the returned epoch. No scheduler, sampler or RNG
state is restored. A kill mid-epoch is simulated in-process by dropping every object (as SIGKILL would) and
rebuilding from the checkpoint file. kubetune's lost steps come from real SIGTERM/SIGKILL of `kubetune-train`
(bench/preemption_lost_steps.py) and its throughput from the trainer driven in-process.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL, IMAGE, BATCH, SAMPLES, EPOCHS, KILL_EPOCH, KILL_BATCH = "test_resnet", 32, 16, 256, 4, 2, 9


class TimmStyle:
    """A train.py-shaped loop: seeded once, shuffled DataLoader, cosine per epoch, validate + checkpoint per epoch."""

    def __init__(self, out: Path) -> None:
        import timm
        import torch
        from timm.utils import CheckpointSaver
        from torch.utils.data import DataLoader

        from kubetune_trainer.data import SyntheticDataset, seeded_split

        torch.manual_seed(0)
        self.torch = torch
        train_idx, val_idx = seeded_split(SAMPLES, 0.1, 0)
        self.loader = DataLoader(
            SyntheticDataset(train_idx, 10, IMAGE, 0), batch_size=BATCH, shuffle=True, drop_last=True
        )
        self.val_loader = DataLoader(SyntheticDataset(val_idx, 10, IMAGE, 0), batch_size=BATCH)
        self.model = timm.create_model(MODEL, num_classes=10).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, EPOCHS)
        out.mkdir(parents=True, exist_ok=True)
        self.saver = CheckpointSaver(
            self.model, self.opt, checkpoint_dir=str(out), recovery_dir=str(out), max_history=2
        )
        self.out = out
        self.start_epoch = 0

    def resume(self) -> None:
        from timm.models import resume_checkpoint

        self.start_epoch = (
            resume_checkpoint(self.model, str(self.out / "last.pth.tar"), self.opt, log_info=False) or 0
        )
        for _ in range(self.start_epoch):
            self.sched.step()  # train.py steps the scheduler to start_epoch; it saves no scheduler state

    def steps(self, kill_at: tuple[int, int] | None = None) -> Iterator[int]:
        """Yield after each optimizer step; stop at (epoch, batch) without saving (the kill)."""
        for epoch in range(self.start_epoch, EPOCHS):
            for batch, (x, y) in enumerate(self.loader):
                if kill_at == (epoch, batch):
                    return
                self.opt.zero_grad(set_to_none=True)
                self.torch.nn.functional.cross_entropy(self.model(x), y).backward()
                self.opt.step()
                yield batch
            self.sched.step()
            self.saver.save_checkpoint(epoch, metric=self.validate())

    def validate(self) -> float:
        """train.py validates every epoch (its metric picks the best checkpoint); kubetune does too."""
        self.model.eval()
        correct = total = 0
        with self.torch.no_grad():
            for x, y in self.val_loader:
                correct += int((self.model(x).argmax(1) == y).sum())
                total += len(y)
        self.model.train()
        return correct / max(1, total)

    def weights(self) -> dict[str, Any]:
        return {k: v.clone() for k, v in self.model.state_dict().items()}


def paired_throughput(workdir: Path) -> tuple[float, float]:
    """(timm-style steps/s, kubetune steps/s): one step of each alternately, so machine load hits both alike.
    Step time includes data loading and each side's checkpointing (timm: per epoch; kubetune: every 10)."""
    from kubetune_trainer import loop
    from kubetune_trainer.config import parse_spec

    spec = {
        "model": {"name": MODEL},
        "data": {"format": "synthetic", "imageSize": IMAGE, "syntheticSamples": SAMPLES, "numWorkers": 0},
        "training": {"epochs": EPOCHS, "batchSize": BATCH},
        "checkpoint": {"everySteps": 10},
        "metrics": {"port": 0},
    }
    trainer = loop.Trainer(parse_spec(spec, name="bench"), workdir / "kubetune", loop.Runtime())
    timm_style = TimmStyle(workdir / "timm")
    kt_steps, timm_steps = trainer.steps(), timm_style.steps()
    kt_times, timm_times = [], []
    while True:
        t0 = time.perf_counter()
        a = next(timm_steps, None)
        t1 = time.perf_counter()
        b = next(kt_steps, None)
        t2 = time.perf_counter()
        if a is None or b is None:
            break
        timm_times.append(t1 - t0)
        kt_times.append(t2 - t1)
    for _ in kt_steps:
        pass
    trainer.close(0)
    return len(timm_times) / sum(timm_times), len(kt_times) / sum(kt_times)


def run() -> dict[str, Any]:
    import logging

    import torch

    from bench import preemption_lost_steps

    logging.getLogger("kubetune_trainer").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        ref = TimmStyle(Path(tmp) / "ref")
        for _ in ref.steps():
            pass
        first = TimmStyle(Path(tmp) / "killed")
        done_before_kill = sum(1 for _ in first.steps(kill_at=(KILL_EPOCH, KILL_BATCH)))
        per_epoch = len(first.loader)
        del first  # SIGKILL: nothing in memory survives
        second = TimmStyle(Path(tmp) / "killed")
        second.resume()
        lost = done_before_kill - second.start_epoch * per_epoch
        for _ in second.steps():
            pass
        exact = all(
            torch.equal(a, b) for a, b in zip(ref.weights().values(), second.weights().values(), strict=True)
        )
        timm_sps, kubetune_sps = paired_throughput(Path(tmp))
    kt = preemption_lost_steps.run()
    return {
        "model": MODEL,
        "steps_per_epoch": per_epoch,
        "killed_at": f"epoch {KILL_EPOCH} batch {KILL_BATCH}",
        "timm_steps_per_second": timm_sps,
        "kubetune_steps_per_second": kubetune_sps,
        "timm_sigkill_lost_steps": lost,
        "timm_resumed_at_epoch": second.start_epoch,
        "timm_resume_bitwise_equal": exact,
        "timm_sigterm_lost_steps": lost,  # train.py has no SIGTERM handler: a graceful stop loses the same
        "kubetune_sigkill_lost_steps": kt["sigkill_lost_steps"],
        "kubetune_sigterm_lost_steps": kt["sigterm_lost_steps"],
        "kubetune_every_steps": kt["every_steps"],
        "kubetune_resume_bitwise_equal": "yes (tests/trainer/test_exactness.py)",
    }


if __name__ == "__main__":
    print(run())
