"""The training loop: one attempt of a run from resume to an Outcome (trained, stopped, or refused).

It builds the parts (components.py), asks the resume ledger (ledger.py) where to continue from, runs
steps (step.py), evaluates (evaluate.py: the report, best/, early stopping), checkpoints (checkpoint.py),
stops on SIGTERM/SIGINT and exports (export.py).

One step is one optimizer update (gradAccumulation micro-batches). Everything that decides the weights
after step N (data order, RNG states, optimizer/scheduler/scaler/EMA state) is in the checkpoint, so a
resumed run is bitwise identical to an uninterrupted one when training.deterministic is on. What the loop
decides besides the weights (when to evaluate, which model is best, when to stop early) is a function of
the step and the checkpointed metrics, so it decides the same after a resume.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer import data as data_mod
from kubetune_trainer import evaluate as eval_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer import telemetry
from kubetune_trainer.checkpoint import Checkpointer, write_json_atomic
from kubetune_trainer.components import (
    build_components,
    build_sampler,
    check_optimizer,
    check_optimizer_args,
    resolve_precision,
)
from kubetune_trainer.config import ConfigError, JobConfig
from kubetune_trainer.evaluate import EvalReport, Misclassified, evaluate
from kubetune_trainer.export import export_final
from kubetune_trainer.ledger import ResumeLedger, trainer_versions
from kubetune_trainer.outcome import Outcome
from kubetune_trainer.runtime import (
    Runtime,
    init_runtime,
    rng_state,
    seed_everything,
    set_rng_state,
    shutdown_runtime,
)
from kubetune_trainer.step import StepRunner
from kubetune_trainer.stop import STOP, signal_name

log = logging.getLogger(__name__)


class Trainer:
    """One attempt of a run: builds the components, resumes from the ledger, trains, ends with an Outcome."""

    def __init__(self, cfg: JobConfig, root: Path, rt: Runtime, log_every_seconds: float = 30.0) -> None:
        self.cfg = cfg
        self.root = root
        self.rt = rt
        self.log_every_seconds = log_every_seconds
        t = cfg.training
        self.deterministic = t.deterministic if t.deterministic is not None else rt.device == "cpu"
        self.device = torch.device(rt.device)
        self.precision = resolve_precision(t.precision, self.device.type)
        self.step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.eval_step = -1
        self.metrics: dict[str, Any] = {}
        """Checkpointed: the last evaluation's eval_* numbers, the best so far, the early-stopping counter."""
        self._iter: Any = None
        self._want_save = False
        self._bad_seen = 0
        self.outcome: Outcome | None = None
        self._setup()

    # -- setup ---------------------------------------------------------------------------------------
    def _setup(self) -> None:
        check_optimizer(self.cfg.training.optimizer)  # exit 2 on a bad name before any data is read
        check_optimizer_args(self.cfg.training)
        cfg, t = self.cfg, self.cfg.training
        seed_everything(t.seed, self.deterministic)
        mdata = model_mod.data_config(cfg.model.name)
        self.data = data_mod.build_datasets(cfg.data, cfg.model.numClasses, mdata, t.seed)
        self.num_classes = cfg.model.numClasses or len(self.data.classes)
        self._check_val_split()
        self.sampler, self.steps_per_epoch = build_sampler(self.data.train, cfg.data.sampling, t, self.rt)
        self.total_steps = t.maxSteps or (t.epochs or 1) * self.steps_per_epoch
        built = model_mod.build_model(cfg.model, self.num_classes, self.data.image_size)
        self.frozen = built.frozen_prefixes
        self.model: nn.Module = model_mod.place(built.model, self.device, t.channelsLast)
        parts = build_components(self.model, t, self.total_steps, self.precision, self.steps_per_epoch)
        self.optimizer, self.scheduler, self.scaler = parts.optimizer, parts.scheduler, parts.scaler
        self.ema, self.criterion = parts.ema, parts.criterion
        if self.rt.distributed:
            ids = [self.rt.local_rank] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # After DDP, as PyTorch documents (DDPOptimizer splits the graph at DDP's bucket boundaries so the
        # all-reduces overlap the backward); optimizer, EMA and checkpoints use the eager module (unwrap).
        self.model = model_mod.compile_model(self.model, t.compile)
        self.stepper = StepRunner(self.model, parts, t, self.rt, self.precision, self.num_classes)
        self._autocast = self.stepper.autocast
        self.ckpt = Checkpointer(self.root, cfg.checkpoint, writer=self.rt.rank == 0)
        self.optimizer.register_step_pre_hook(lambda *_: self.ckpt.wait_copied())
        self.ledger = ResumeLedger(self.root, self.rt, self.ckpt)
        state = self.ledger.open(cfg, self.data.classes, self.sampler.n, self.total_steps)
        if state:
            self._load_state(state)
            log.info(
                "resumed from %s (step %d, epoch %d, batch %d)",
                self.ledger.checkpoint_path,
                self.step,
                self.epoch,
                self.step_in_epoch,
            )
        self.checkpoint_path, self.checkpoint_step = self.ledger.checkpoint_path, self.ledger.checkpoint_step
        self.telemetry = telemetry.build(cfg, self.rt.rank, self.log_every_seconds, checkpoint_dir=self.root)
        if not self.ledger.finished:
            self._write_progress()

    def _check_val_split(self) -> None:
        """checkpoint.best and training.earlyStopping act on evaluations: without a split they never would."""
        for path, value in (
            ("training.earlyStopping", self.cfg.training.earlyStopping),
            ("checkpoint.best", self.cfg.checkpoint.best),
        ):
            if value is not None and self.data.val is None:
                raise ConfigError(
                    f"{path}: needs a validation split, and this data has none; set data.valFraction above "
                    f"0 (or add a val/ folder), or remove {path}"
                )
        for path, watched in (
            ("training.earlyStopping.metric", self.cfg.training.earlyStopping),
            ("checkpoint.best.metric", self.cfg.checkpoint.best),
        ):
            if watched is not None and watched.metric == "top5" and self.num_classes <= 5:
                raise ConfigError(
                    f"{path}: top5 is always 1 with {self.num_classes} classes, so it can never improve; "
                    "watch top1 or loss"
                )

    @property
    def lost_steps_total(self) -> int:
        return self.ledger.lost_steps_total

    def _load_state(self, s: dict[str, Any]) -> None:
        model_mod.unwrap(self.model).load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        model_mod.match_state_layout(self.optimizer)  # channels_last moments, as an uninterrupted run has
        self.scheduler.load_state_dict(s["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(s["ema"])
        self.step, self.epoch, self.step_in_epoch = s["step"], s["epoch"], s["step_in_epoch"]
        self.eval_step = s["eval_step"]
        self.metrics = dict(s["metrics"])
        set_rng_state(s["rng"])

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit (tensors are referenced; the checkpointer copies them)."""
        return {
            "model": model_mod.unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "eval_step": self.eval_step,
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "spec": self.cfg.to_spec(),
            "classes": self.data.classes,
            "train_size": self.sampler.n,
            "world_size": self.rt.world_size,
            "wandb_run_id": self.ledger.run_id,
            "metrics": dict(self.metrics),
            "trainer": trainer_versions(),
        }

    def _write_progress(self, finished: bool = False) -> None:
        tele = getattr(self, "telemetry", None)
        wandb_step = tele.last_logged_step if tele else -1
        self.ledger.checkpoint_step = self.checkpoint_step
        self.ledger.write(self.step, self.total_steps, wandb_step, finished)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> Outcome:
        """Train to the end or to a SIGTERM; the returned Outcome says which."""
        if self.ledger.finished:
            final = self.root / "final"
            log.info("this run already finished at step %d; its model is in %s", self.step, final)
            why = self._early_stop_reason()
            if why:
                return self._outcome(
                    "EarlyStopped",
                    0,
                    f"already stopped early at step {self.step}: {why}; model at {final}; nothing to do",
                )
            return self._outcome(
                "Completed", 0, f"already finished ({self.step} steps); model at {final}; nothing to do"
            )
        for _ in self.steps():
            pass
        assert self.outcome is not None
        return self.outcome

    def steps(self) -> Iterator[int]:
        """The loop as a generator yielding the global step after each optimizer step (benchmarks drive it
        step by step); sets self.outcome when it ends."""
        info = self.ledger.run_info(
            self.total_steps, self.step, self.cfg.to_spec(), self.step * self._global_batch()
        )
        d = self.data
        self.telemetry.watch(
            telemetry.ModelView(model_mod.unwrap(self.model), d.image_size, d.eval_cfg, d.classes)
        )
        self.telemetry.start(info)
        model_mod.set_train_mode(self.model, self.frozen)
        self._last_time = time.perf_counter()
        while True:
            if self._poll():
                self.outcome = self._preempt()
                return
            if self._stopped_early():
                break
            if self.step_in_epoch >= self.steps_per_epoch:
                self._end_epoch()
                continue
            if self.step >= self.total_steps:
                break
            self._train_step()
            yield self.step
        self.outcome = self._finish()

    def _global_batch(self) -> int:
        t = self.cfg.training
        return t.batchSize * t.gradAccumulation * self.rt.world_size

    def _poll(self) -> bool:
        """At each step boundary: agree across ranks on stop (SIGTERM on any rank), on saving (the
        everySeconds clock differs per rank) and on the count of undecodable training images (exit 2 on
        every rank alike); start an async save if due. Returns True to stop."""
        want_save, self._want_save = self._want_save, False
        bad = data_mod.bad_count(self.data.train)
        if self.rt.distributed:
            flags = torch.tensor([float(STOP.is_set()), float(want_save), float(bad)], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            stop, want_save, bad = bool(flags[0].item()), bool(flags[1].item()), int(flags[2].item())
        else:
            stop = STOP.is_set()
        if bad != self._bad_seen:
            self._report_bad(self.data.train, bad, "train")
        if stop:
            return True
        if want_save:
            self._save(sync=False)
        return False

    def _report_bad(self, dataset: Any, count: int, split: str) -> None:
        """New undecodable images: the metric, a WARNING with the step and paths, the fraction check."""
        if split == "train":
            self._bad_seen = count
        self.telemetry.bad_images(self.data.bad_images())
        data_mod.report_bad(dataset, count, split, self.step, self.cfg.data.maxBadFraction)

    def _max_over_ranks(self, value: float) -> float:
        if not self.rt.distributed:
            return value
        box = torch.tensor([value], device=self.device)
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return float(box.item())

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            accum = self.cfg.training.gradAccumulation
            self.sampler.set_position(self.epoch, self.step_in_epoch * accum)
            loader = data_mod.make_loader(
                self.data.train, self.sampler, self.cfg.data.numWorkers, self.cfg.training.seed, self.epoch
            )
            self._iter = iter(loader)
        try:
            x, y = next(self._iter)
        except Exception:  # a worker whose stand-ins ran out too: name the files, not the traceback
            data_mod.check_bad(self.data.train, self.cfg.data.maxBadFraction, "train")
            raise
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _train_step(self) -> None:
        stats = self.stepper.run(self._next_batch, self.step + 1, self.epoch)
        self.step += 1
        self.step_in_epoch += 1
        self._after_step(stats)

    def _after_step(self, stats: dict[str, float]) -> None:
        now = time.perf_counter()
        dt, self._last_time = now - self._last_time, now
        self.metrics.update(loss=stats["loss"], learning_rate=stats["learning_rate"])
        self.telemetry.log_step(
            self.step,
            {
                **stats,
                "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                "samples": float(self._global_batch()),
                "samples_per_second": self._global_batch() / max(dt, 1e-9),
            },
        )
        self._drain_saves()
        self._write_progress()
        every = self.cfg.evaluation.everySteps
        if every and self.step % every == 0:
            self._evaluate()  # epoch ends and the final step evaluate anyway (once per step)
        mid_epoch = self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps
        self._want_save = mid_epoch and self.ckpt.should_save(self.step)  # agreed on in _poll

    def _end_epoch(self) -> None:
        self._evaluate()
        self.epoch += 1
        self.step_in_epoch = 0
        self._iter = None
        if self.step < self.total_steps and not self._stopped_early():  # _finish saves then
            self._save(sync=False)

    def _save(self, sync: bool) -> None:
        self.telemetry.flush()  # what was logged up to this step is on disk before its checkpoint is
        if self.rt.distributed:
            dist.barrier()
        if sync:
            t0 = time.perf_counter()
            self.ckpt.save_sync(self.step, self.state())
            seconds = time.perf_counter() - t0
        else:
            seconds = self.ckpt.save_async(self.step, self.state(), self._unchanged_until_step())
        if self.rt.distributed:
            dist.barrier()
        if sync:  # durable on every rank once rank 0 passed the barrier
            log.info("checkpoint step %d written synchronously in %.3fs", self.step, seconds)
            self.checkpoint_path, self.checkpoint_step = str(self.ckpt.path_for(self.step)), self.step
        self._drain_saves()

    def _unchanged_until_step(self) -> Callable[[torch.Tensor], bool]:
        """Tensors only optimizer.step() and the EMA update (right after it) modify; the checkpoint writer may
        copy them during the next forward/backward (an optimizer pre-hook waits for that copy)."""
        ptrs = {p.data_ptr() for p in self.model.parameters()}
        for per_param in self.optimizer.state.values():
            ptrs.update(v.data_ptr() for v in per_param.values() if isinstance(v, torch.Tensor))
        if self.ema is not None:
            ptrs.update(t.data_ptr() for t in self.ema.state_dict().values())
        return lambda t: t.data_ptr() in ptrs

    def _drain_saves(self) -> None:
        """Report saves that became durable (async ones finish in the background)."""
        for step, seconds, path in self.ckpt.drain_completed():
            self.checkpoint_path, self.checkpoint_step = str(path), step
            self.telemetry.checkpoint_saved(step, seconds)

    def _eval_model(self) -> nn.Module:
        """The weights that are evaluated and exported: the EMA copy when training.ema is on."""
        if self.ema is not None:
            ema_module: nn.Module = self.ema.module  # type: ignore[assignment]
            return ema_module
        return model_mod.unwrap(self.model)

    def _evaluate(self) -> None:
        """Evaluate once per step (every rank, same numbers); rank 0 writes eval/step-N.json and, when the
        model is the best so far (checkpoint.best), exports it to best/."""
        if self.data.val is None or self.eval_step == self.step:
            return
        c = self.cfg
        wrong = Misclassified(self.telemetry.eval_samples_wanted)
        report = evaluate(
            self._eval_model(),
            self.data.val,
            self.rt,
            c.training.batchSize,
            c.data.numWorkers,
            self._autocast,
            classes=self.data.classes,
            misclassified=wrong,
            channels_last=c.training.channelsLast,
        )
        result = report.metrics()
        # The best so far travels in the checkpoint (self.metrics), so it spans attempts.
        result["eval_best_top1"] = max(result["eval_top1"], self.metrics.get("eval_best_top1", 0.0))
        bad = int(self._max_over_ranks(data_mod.bad_count(self.data.val)))
        if bad:
            self._report_bad(self.data.val, bad, "val")
        self.metrics.update(result)
        self.eval_step = self.step
        new_best = eval_mod.record(
            self.metrics, report, self.step, c.checkpoint.best, c.training.earlyStopping
        )
        if eval_mod.BEST_METRIC in self.metrics:
            result["eval_best_metric"] = float(self.metrics[eval_mod.BEST_METRIC])
            result["eval_best_step"] = float(self.metrics[eval_mod.BEST_STEP])
        log.info(
            "eval at step %d (epoch %d): %s",
            self.step,
            self.epoch,
            {k: round(v, 4) for k, v in result.items()},
        )
        if self.rt.rank == 0:
            self._write_eval_report(report)
            if new_best:
                self._export_best()
        self.scheduler.step_eval(result)
        self.telemetry.log_eval(self.step, result)
        self.telemetry.log_eval_samples(self.step, wrong)
        model_mod.set_train_mode(self.model, self.frozen)

    def _write_eval_report(self, report: EvalReport) -> None:
        """eval/step-N.json beside the checkpoints (a resume that redoes the step rewrites the same)."""
        out = self.root / "eval"
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / f"step-{self.step:08d}.json", report.to_doc(self.step, self.epoch))

    def _export_best(self) -> None:
        """best/: the model just evaluated, and best.json saying which evaluation it is. A kill between the
        two leaves best.json one best behind until the resumed run redoes that step (same weights)."""
        weights = self._export("best")
        m = self.metrics
        doc = {
            "metric": m[eval_mod.BEST_NAME],
            "value": m[eval_mod.BEST_METRIC],
            "step": m[eval_mod.BEST_STEP],
        }
        write_json_atomic(weights.parent / "best.json", doc)
        log.info("new best eval %s %.4f at step %d: model written to %s", *doc.values(), weights)

    def _stopped_early(self) -> bool:
        return eval_mod.early_stop_reached(self.metrics, self.cfg.training.earlyStopping)

    def _early_stop_reason(self) -> str | None:
        """Why the run ended before its last step (training.earlyStopping), or None when it did not."""
        stop = self.cfg.training.earlyStopping
        if stop is None or self.step >= self.total_steps or not self._stopped_early():
            return None
        return eval_mod.early_stop_reason(self.metrics, stop)

    def _export(self, name: str) -> Path:
        """The evaluated weights (EMA when on) as <root>/<name>/, loadable by timm (export.py)."""
        pcfg = dict(getattr(model_mod.unwrap(self.model), "pretrained_cfg", {}) or {})
        return export_final(
            self.root / name,
            self._eval_model().state_dict(),
            self.cfg.model.name,
            pcfg,
            self.data.eval_cfg,
            self.data.classes,
            self.num_classes,
        )

    # -- endings -------------------------------------------------------------------------------------
    def _preempt(self) -> Outcome:
        self.telemetry.preempting()
        sig, t0 = signal_name(), time.perf_counter()
        if self.step == 0 and self.checkpoint_step is None:
            log.info("%s before the first step: nothing trained, nothing to save", sig)
            return self._outcome("Preempted", 143, f"stopped by {sig} before the first step; nothing to save")
        if self.ckpt.last_saved_step != self.step:
            self._save(sync=True)
        else:
            self.ckpt.wait()
            if self.rt.distributed:
                dist.barrier()
            self._drain_saves()
        log.info("%s: checkpoint at step %d durable after %.3fs", sig, self.step, time.perf_counter() - t0)
        self._write_progress()
        return self._outcome("Preempted", 143, f"stopped by {sig} at step {self.step}; checkpoint saved")

    def _finish(self) -> Outcome:
        """The last step or early stopping: evaluate, checkpoint, export final/, mark progress finished."""
        evaluated = self.eval_step
        self._evaluate()
        # Also re-save the step when this evaluation is new (a SIGTERM right after the last step saved it
        # before evaluating): the checkpoint must hold the evaluation, the best so far and plateau's state,
        # or an extended resume (more epochs/maxSteps) would continue from a state without them.
        if self.ckpt.last_saved_step != self.step or self.eval_step != evaluated:
            self._save(sync=True)
        self.ckpt.wait()
        self._drain_saves()
        final = None
        if self.rt.rank == 0:
            final = self._export("final")
            log.info("final model written to %s", final)
        if self.rt.distributed:
            dist.barrier()
        self._write_progress(finished=True)
        top1 = self.metrics.get("eval_top1")
        acc = f", eval top-1 {top1:.4f}" if top1 is not None else ""
        where = f"model at {final or self.root / 'final'}"
        why = self._early_stop_reason()
        if why:
            log.info("stopped early at step %d of %d: %s", self.step, self.total_steps, why)
            return self._outcome("EarlyStopped", 0, f"stopped early at step {self.step}: {why}{acc}; {where}")
        return self._outcome("Completed", 0, f"finished {self.step} steps{acc}; {where}")

    def _outcome(self, reason: str, code: int, message: str) -> Outcome:
        m = self.metrics
        last = None
        if self.eval_step >= 0 and "eval_top1" in m:
            last = {
                "step": self.eval_step,
                **{k: round(float(m[f"eval_{k}"]), 6) for k in ("top1", "top5", "loss")},
            }
        best = m.get(eval_mod.BEST_METRIC)
        return Outcome(
            reason=reason,
            exit_code=code,
            step=self.step,
            total_steps=self.total_steps,
            epoch=self.epoch,
            checkpoint=self.checkpoint_path,
            checkpoint_step=self.checkpoint_step,
            lost_steps=self.lost_steps_total,
            message=message,
            eval=last,
            best_metric=round(float(best), 6) if best is not None else None,
            best_metric_name=m.get(eval_mod.BEST_NAME),
            best_step=int(m[eval_mod.BEST_STEP]) if best is not None else None,
        )

    def close(self, exit_code: int) -> None:
        """Flush telemetry on every exit path (W&B finish gets the exit code)."""
        tele = getattr(self, "telemetry", None)
        if tele is not None:
            tele.finish(exit_code)
        with contextlib.suppress(Exception):
            self.ckpt.wait()
        if hasattr(self, "ledger"):
            self.ledger.close()


__all__ = ["STOP", "Outcome", "Runtime", "Trainer", "init_runtime", "shutdown_runtime"]
