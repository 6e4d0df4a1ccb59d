"""Generate kubetune's Grafana dashboard (charts/kubetune/dashboards/kubetune.json) from Python.

The dashboard is reviewed as code: panels are declared below as small dataclasses and rendered to the
Grafana dashboard JSON model (schemaVersion 39). `--check` exits 1 when the committed JSON differs from
what this file generates (tests/chart runs it), so the JSON is never edited by hand.

    python hack/dashboard/generate.py           # rewrite the JSON
    python hack/dashboard/generate.py --check   # verify it is up to date

Series and labels: trainer series (kubetune_trainer_*) carry `job` = FineTuneJob name and `namespace`
(the PodMonitor keeps them with honorLabels) and `pod` (added by Prometheus); operator series
(kubetune_*) come from the operator's metrics Service. GPU panels join dcgm-exporter's
DCGM_FI_DEV_GPU_UTIL / DCGM_FI_DEV_FB_USED (labels namespace, pod) onto trainer pods on (namespace, pod).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "charts" / "kubetune" / "dashboards" / "kubetune.json"

UID = "kubetune-overview"
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'namespace=~"$namespace", job=~"$job"'
# One trainer pod per (namespace, job, pod): used to attach the FineTuneJob name to DCGM's GPU series.
TRAINER_PODS = f"max by (namespace, pod, job) (kubetune_trainer_step{{{SEL}}} * 0 + 1)"
# Steps per second over the recent window; deriv because the step gauge goes back after a resume.
STEP_RATE = f"deriv(kubetune_trainer_step{{{SEL}}}[$__rate_interval])"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    # False for series that only exist in some clusters (DCGM); tests still check that they parse.
    expect_data: bool = True
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | stat | bargauge | gauge | table
    queries: tuple[Query, ...]
    unit: str = "short"
    width: int = 8
    height: int = 8
    description: str = ""
    min: float | None = None
    max: float | None = None
    stack: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


ROWS: tuple[Row, ...] = (
    Row(
        "Jobs",
        (
            Panel(
                "FineTuneJobs by phase",
                "bargauge",
                # max over replicas: followers report the same cache as the leader.
                (Query("max by (phase) (kubetune_jobs)", "{{phase}}", instant=True),),
                width=8,
                description="FineTuneJobs known to the operator, by status.phase.",
            ),
            Panel(
                "Progress",
                "bargauge",
                (
                    Query(
                        f"kubetune_trainer_step{{{SEL}}} / kubetune_trainer_total_steps{{{SEL}}}",
                        "{{namespace}}/{{job}}",
                        instant=True,
                    ),
                ),
                unit="percentunit",
                min=0,
                max=1,
                description="Optimizer steps done / total steps, per job.",
            ),
            Panel(
                "ETA",
                "table",
                (
                    Query(
                        f"(kubetune_trainer_total_steps{{{SEL}}} - kubetune_trainer_step{{{SEL}}})"
                        f" / ({STEP_RATE} > 0)",
                        "{{namespace}}/{{job}}",
                        instant=True,
                    ),
                ),
                unit="s",
                description="Remaining steps divided by the recent step rate (empty while a job is stalled).",
            ),
        ),
    ),
    Row(
        "Training",
        (
            Panel(
                "Loss",
                "timeseries",
                (Query(f"kubetune_trainer_loss{{{SEL}}}", "{{namespace}}/{{job}}"),),
            ),
            Panel(
                "Eval accuracy (top-1)",
                "timeseries",
                (Query(f"kubetune_trainer_eval_accuracy{{{SEL}}}", "{{namespace}}/{{job}}"),),
                unit="percentunit",
                min=0,
                max=1,
            ),
            Panel(
                "Throughput",
                "timeseries",
                (Query(f"kubetune_trainer_samples_per_second{{{SEL}}}", "{{namespace}}/{{job}}"),),
                unit="short",
                description="Training samples per second, all ranks.",
            ),
            Panel(
                "Learning rate",
                "timeseries",
                (Query(f"kubetune_trainer_learning_rate{{{SEL}}}", "{{namespace}}/{{job}}"),),
            ),
            Panel(
                "Step",
                "timeseries",
                (
                    Query(f"kubetune_trainer_step{{{SEL}}}", "{{namespace}}/{{job}} step"),
                    Query(f"kubetune_trainer_checkpoint_step{{{SEL}}}", "{{namespace}}/{{job}} checkpoint"),
                ),
                description="Global step and the step of the newest durable checkpoint.",
            ),
        ),
    ),
    Row(
        "Checkpoints",
        (
            Panel(
                "Checkpoint age",
                "timeseries",
                (
                    Query(
                        f"(kubetune_trainer_step{{{SEL}}} - kubetune_trainer_checkpoint_step{{{SEL}}})"
                        f" / ({STEP_RATE} > 0)",
                        "{{namespace}}/{{job}}",
                    ),
                ),
                unit="s",
                description=(
                    "Training time since the newest checkpoint (steps since it / step rate): what a "
                    "preemption now would throw away."
                ),
            ),
            Panel(
                "Steps since checkpoint",
                "timeseries",
                (
                    Query(
                        f"kubetune_trainer_step{{{SEL}}} - kubetune_trainer_checkpoint_step{{{SEL}}}",
                        "{{namespace}}/{{job}}",
                    ),
                ),
            ),
            Panel(
                "Checkpoint save duration",
                "timeseries",
                (
                    Query(
                        "histogram_quantile(0.9, sum by (namespace, job, le) "
                        f"(rate(kubetune_trainer_checkpoint_seconds_bucket{{{SEL}}}[$__rate_interval])))",
                        "p90 {{namespace}}/{{job}}",
                        # A rate needs two saves inside the window; the mean below is always defined.
                        expect_data=False,
                    ),
                    Query(
                        f"kubetune_trainer_checkpoint_seconds_sum{{{SEL}}}"
                        f" / kubetune_trainer_checkpoint_seconds_count{{{SEL}}}",
                        "mean {{namespace}}/{{job}}",
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "Preemptions and recovery",
        (
            Panel(
                "Preemptions by reason",
                "timeseries",
                (
                    Query(
                        "sum by (reason) (increase(kubetune_preemptions_total[$__rate_interval]))",
                        "{{reason}}",
                    ),
                ),
                stack=True,
                description="Trainer attempts ended by a disruption (DisruptionTarget reason or deletion).",
            ),
            Panel(
                "Pod failures by cause",
                "timeseries",
                (
                    Query(
                        "sum by (cause) (increase(kubetune_pod_failures_total[$__rate_interval]))",
                        "{{cause}}",
                    ),
                ),
                stack=True,
            ),
            Panel(
                "Lost steps",
                "timeseries",
                (
                    Query(
                        "sum(increase(kubetune_lost_steps_total[$__rate_interval]))", "all jobs (operator)"
                    ),
                    Query(f"kubetune_trainer_lost_steps_total{{{SEL}}}", "{{namespace}}/{{job}} (total)"),
                ),
                description="Steps reached but not checkpointed before an interruption, re-trained after it.",
            ),
            Panel(
                "Recovery time",
                "timeseries",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le) (rate(kubetune_recovery_seconds_bucket[$__rate_interval])))",
                        "p50",
                        expect_data=False,
                    ),
                    Query(
                        "histogram_quantile(0.9, sum by (le) (rate(kubetune_recovery_seconds_bucket[$__rate_interval])))",
                        "p90",
                        expect_data=False,
                    ),
                    Query(
                        "sum(kubetune_recovery_seconds_sum) / sum(kubetune_recovery_seconds_count)",
                        "mean (all time)",
                        expect_data=False,
                    ),
                ),
                unit="s",
                description="Disruption seen -> replacement pod created.",
            ),
            Panel(
                "Time queued (Kueue)",
                "timeseries",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le) (rate(kubetune_queued_seconds_bucket[$__rate_interval])))",
                        "p50",
                        expect_data=False,
                    ),
                    Query(
                        "histogram_quantile(0.9, sum by (le) (rate(kubetune_queued_seconds_bucket[$__rate_interval])))",
                        "p90",
                        expect_data=False,
                    ),
                    Query(
                        "sum(increase(kubetune_queued_seconds_count[$__rate_interval]))",
                        "admissions",
                        expect_data=False,
                    ),
                ),
                unit="s",
                description="Kueue-queued jobs: the wait in the LocalQueue before each admission (first or "
                "after an eviction).",
            ),
            Panel(
                "Resumes",
                "timeseries",
                (Query(f"kubetune_trainer_resumes_total{{{SEL}}}", "{{namespace}}/{{job}}"),),
            ),
            Panel(
                "Reconcile time p99",
                "timeseries",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (le) (rate(kubetune_reconcile_seconds_bucket[$__rate_interval])))",
                        "p99",
                        expect_data=False,
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "GPUs (dcgm-exporter)",
        (
            Panel(
                "GPU utilisation",
                "timeseries",
                (
                    Query(
                        "avg by (namespace, pod) (DCGM_FI_DEV_GPU_UTIL)"
                        f" * on (namespace, pod) group_left (job) {TRAINER_PODS}",
                        "{{namespace}}/{{job}} {{pod}}",
                        expect_data=False,
                    ),
                ),
                unit="percent",
                min=0,
                max=100,
                description="dcgm-exporter's DCGM_FI_DEV_GPU_UTIL of the GPUs attached to trainer pods.",
            ),
            Panel(
                "GPU framebuffer used",
                "timeseries",
                (
                    Query(
                        "sum by (namespace, pod) (DCGM_FI_DEV_FB_USED)"
                        f" * on (namespace, pod) group_left (job) {TRAINER_PODS}",
                        "{{namespace}}/{{job}} {{pod}} (DCGM)",
                        expect_data=False,
                    ),
                    Query(
                        f"kubetune_trainer_gpu_memory_bytes{{{SEL}}} / 1024 / 1024",
                        "{{namespace}}/{{job}} {{pod}} (torch allocated)",
                        expect_data=False,
                    ),
                ),
                unit="decmbytes",
                description="DCGM framebuffer in use (MiB) and the memory PyTorch allocated.",
            ),
        ),
    ),
)


def _targets(panel: Panel) -> list[dict[str, Any]]:
    return [
        {
            "datasource": DS,
            "expr": q.expr,
            "legendFormat": q.legend,
            "refId": chr(ord("A") + n),
            "instant": q.instant,
            "range": not q.instant,
        }
        for n, q in enumerate(panel.queries)
    ]


def _panel(panel: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stack else 0,
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
            "spanNulls": False,
        }
    out: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": _targets(panel),
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
    }
    if panel.kind in ("bargauge", "gauge", "stat"):
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
        }
    if panel.kind == "table":
        out["options"] = {"showHeader": True}
        out["transformations"] = [{"id": "reduce", "options": {"reducers": ["lastNotNull"]}}]
    return out


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + panel.height
            panels.append(_panel(panel, pid, x, y))
            pid, x = pid + 1, x + panel.width
        y += max(p.height for p in row.panels)
    return {
        "uid": UID,
        "title": "kubetune: fine-tuning jobs",
        "description": "FineTuneJobs: progress, training curves, checkpoints, preemptions, GPUs. "
        "Generated by hack/dashboard/generate.py; do not edit by hand.",
        "tags": ["kubetune", "training"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _variable("namespace", "Namespace", "label_values(kubetune_trainer_step, namespace)"),
                _variable(
                    "job", "FineTuneJob", 'label_values(kubetune_trainer_step{namespace=~"$namespace"}, job)'
                ),
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


def queries() -> list[tuple[str, Query]]:
    """(panel title, query) for every panel query: the tests run each against a real Prometheus."""
    return [(panel.title, q) for row in ROWS for panel in row.panels for q in panel.queries]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    p.add_argument("--output", type=Path, default=OUTPUT)
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python hack/dashboard/generate.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
