"""The operator's own Prometheus metrics, and parsing of the trainer's metrics endpoint."""

from __future__ import annotations

from collections import Counter as _Tally
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from kubetune_operator.lifecycle import Progress
from kubetune_operator.status import PHASES

_RECOVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_QUEUED_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
_RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _JobsByPhase:
    """`kubetune_jobs{phase}` computed from the operator's job cache at scrape time."""

    def __init__(self, phases: Callable[[], Iterable[str]]) -> None:
        self._phases = phases

    def collect(self) -> Iterator[Metric]:
        tally = _Tally(self._phases())
        family = GaugeMetricFamily(
            "kubetune_jobs", "FineTuneJobs known to the operator, by phase", labels=["phase"]
        )
        for phase in PHASES:
            family.add_metric([phase], tally.get(phase, 0))
        yield family


class _ApiRequests:
    """`kubetune_api_requests_total`: requests the reconcilers sent (kopf's watch streams excluded)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "kubetune_api_requests", "Kubernetes API requests made by the reconcilers", value=self._count()
        )


class OperatorMetrics:
    def __init__(self, phases: Callable[[], Iterable[str]], api_requests: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_JobsByPhase(phases))
        self.registry.register(_ApiRequests(api_requests))
        r = self.registry
        self.preemptions = Counter(
            "kubetune_preemptions_total",
            "Trainer attempts ended by a disruption, by reason",
            ["reason"],
            registry=r,
        )
        self.pod_failures = Counter(
            "kubetune_pod_failures_total",
            "Trainer attempts ended by a failure, by cause",
            ["cause"],
            registry=r,
        )
        self.lost_steps = Counter(
            "kubetune_lost_steps_total",
            "Training steps that must be re-trained because of disruptions",
            registry=r,
        )
        self.recovery = Histogram(
            "kubetune_recovery_seconds",
            "Seconds from a disruption being seen to the replacement pod being created",
            buckets=_RECOVERY_BUCKETS,
            registry=r,
        )
        self.queued = Histogram(
            "kubetune_queued_seconds",
            "Seconds a Kueue-queued job waited in its LocalQueue before admission (each admission)",
            buckets=_QUEUED_BUCKETS,
            registry=r,
        )
        self.reconcile = Histogram(
            "kubetune_reconcile_seconds",
            "Seconds spent in one reconcile of one job",
            buckets=_RECONCILE_BUCKETS,
            registry=r,
        )

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


def parse_trainer_metrics(text: str) -> Progress | None:
    """Progress from a trainer's /metrics text (exposition format); None when it has no step yet."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("kubetune_trainer_") and sample.name not in values:
                values[sample.name] = float(sample.value)
    if "kubetune_trainer_step" not in values:
        return None

    def opt_int(name: str) -> int | None:
        return int(values[name]) if name in values else None

    def opt(name: str) -> float | None:
        return values.get(name)

    return Progress(
        step=int(values["kubetune_trainer_step"]),
        total_steps=opt_int("kubetune_trainer_total_steps"),
        epoch=opt_int("kubetune_trainer_epoch"),
        samples_per_second=opt("kubetune_trainer_samples_per_second"),
        checkpoint_step=opt_int("kubetune_trainer_checkpoint_step"),
        loss=opt("kubetune_trainer_loss"),
        accuracy=opt("kubetune_trainer_eval_accuracy"),
        top5=opt("kubetune_trainer_eval_top5"),
        best_metric=opt("kubetune_trainer_best_metric"),
        best_step=opt_int("kubetune_trainer_best_step"),
    )
