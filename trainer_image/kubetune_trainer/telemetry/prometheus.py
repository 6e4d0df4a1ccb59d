"""Prometheus metrics served over HTTP from a private registry (labels job/namespace from the environment)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune_trainer.telemetry import RunInfo, Telemetry

log = logging.getLogger(__name__)

LABELS = ("job", "namespace")
CHECKPOINT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class PrometheusTelemetry(Telemetry):
    def __init__(self, port: int) -> None:
        self.port = port
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=r)

        self.step = gauge("kubetune_trainer_step", "Optimizer steps completed (global step).")
        self.total_steps = gauge("kubetune_trainer_total_steps", "Optimizer steps the job will run in total.")
        self.epoch = gauge("kubetune_trainer_epoch", "Current epoch (fractional).")
        self.samples = Counter(
            "kubetune_trainer_samples", "Training samples processed, all ranks.", LABELS, registry=r
        )
        self.samples_per_second = gauge(
            "kubetune_trainer_samples_per_second", "Training throughput, all ranks."
        )
        self.loss = gauge("kubetune_trainer_loss", "Training loss of the last step.")
        self.learning_rate = gauge("kubetune_trainer_learning_rate", "Learning rate of the last step.")
        self.eval_accuracy = gauge(
            "kubetune_trainer_eval_accuracy", "Top-1 accuracy of the last evaluation (0-1)."
        )
        self.eval_top5 = gauge("kubetune_trainer_eval_top5", "Top-5 accuracy of the last evaluation (0-1).")
        self.best_metric = gauge(
            "kubetune_trainer_best_metric",
            "checkpoint.best: the best evaluated metric so far (the model in best/).",
        )
        self.best_step = gauge(
            "kubetune_trainer_best_step", "checkpoint.best: the step of the model in best/."
        )
        self.checkpoint_seconds = Histogram(
            "kubetune_trainer_checkpoint_seconds",
            "Seconds to write a checkpoint durably.",
            LABELS,
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.checkpoint_step = gauge(
            "kubetune_trainer_checkpoint_step", "Step of the newest durable checkpoint."
        )
        self.resumes = Counter(
            "kubetune_trainer_resumes", "Times this job resumed from a checkpoint.", LABELS, registry=r
        )
        self.lost_steps = Counter(
            "kubetune_trainer_lost_steps",
            "Steps redone after interruptions (reached but not checkpointed).",
            LABELS,
            registry=r,
        )
        self.bad_images_total = Counter(
            "kubetune_trainer_bad_images",
            "Images that failed to decode and were replaced by a seeded stand-in sample (this attempt).",
            LABELS,
            registry=r,
        )
        self._bad_reported = 0
        self.gpu_memory: Gauge | None = None
        self._server: Any = None
        self._labels: dict[str, str] = {}

    def start(self, info: RunInfo) -> None:
        self._labels = {"job": info.job, "namespace": info.namespace}
        lab = self._labels
        self.total_steps.labels(**lab).set(info.total_steps)
        self.step.labels(**lab).set(info.start_step)
        # Totals carried over from earlier attempts (persisted in progress.json) keep the counters monotonic.
        self.samples.labels(**lab).inc(info.samples_done)
        self.resumes.labels(**lab).inc(info.resumes)
        self.lost_steps.labels(**lab).inc(info.lost_steps)
        self.checkpoint_step.labels(**lab).set(info.extra.get("checkpoint_step", 0))
        import torch

        if torch.cuda.is_available():
            self.gpu_memory = Gauge(
                "kubetune_trainer_gpu_memory_bytes",
                "CUDA memory allocated by this process.",
                LABELS,
                registry=self.registry,
            )
        try:
            self._server, _ = start_http_server(self.port, registry=self.registry)
        except OSError as e:
            log.warning("metrics server not started on port %d: %s", self.port, e)
        else:
            log.info("serving metrics on :%d/metrics", self.port)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        lab = self._labels
        self.step.labels(**lab).set(step)
        self.epoch.labels(**lab).set(metrics["epoch"])
        self.samples.labels(**lab).inc(metrics["samples"])
        self.samples_per_second.labels(**lab).set(metrics["samples_per_second"])
        self.loss.labels(**lab).set(metrics["loss"])
        self.learning_rate.labels(**lab).set(metrics["learning_rate"])
        if self.gpu_memory is not None:
            import torch

            self.gpu_memory.labels(**lab).set(torch.cuda.memory_allocated())

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        lab = self._labels
        self.eval_accuracy.labels(**lab).set(metrics["eval_top1"])
        if "eval_top5" in metrics:
            self.eval_top5.labels(**lab).set(metrics["eval_top5"])
        if "eval_best_metric" in metrics:
            self.best_metric.labels(**lab).set(metrics["eval_best_metric"])
            self.best_step.labels(**lab).set(metrics["eval_best_step"])

    def bad_images(self, count: int) -> None:
        if count > self._bad_reported:
            self.bad_images_total.labels(**self._labels).inc(count - self._bad_reported)
            self._bad_reported = count

    def checkpoint_saved(self, step: int, seconds: float) -> None:
        self.checkpoint_seconds.labels(**self._labels).observe(seconds)
        self.checkpoint_step.labels(**self._labels).set(step)

    def finish(self, exit_code: int) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
