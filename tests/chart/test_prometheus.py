"""The chart's alerts and the generated dashboard against a real Prometheus (Debian's package, started by
hack/prometheus.sh on 127.0.0.1) scraping real endpoints:

* a trainer: kubetune_trainer.telemetry.prometheus.PrometheusTelemetry served on a loopback port and
  fed steps, evaluations and checkpoints by a thread (the same calls the training loop makes);
* the operator: a real `kubetune-operator` process (tests/opkit) on the local control plane, driving a
  job through an eviction (preemption) and a failure so its counters and histograms have samples;
* a DCGM stand-in: no dcgm-exporter (no GPU) exists here, so a loopback endpoint serves
  DCGM_FI_DEV_GPU_UTIL / DCGM_FI_DEV_FB_USED with dcgm-exporter's pod/namespace labels. It proves the
  GPU panels' join onto trainer pods, not that dcgm-exporter is deployed right.

`promtool check rules` checks the PrometheusRule's rules; Prometheus loads and evaluates them; every
panel query and alert expression runs through /api/v1/query.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import Helm
from kubeutil import REPO, NotYet, dedicated_toleration, patch_pod_terminated, wait_for
from opkit import OperatorProcess, apply, free_port, job_manifest

pytestmark = pytest.mark.cluster

PROMETHEUS_SH = REPO / "hack" / "prometheus.sh"
PROMTOOL = Path("/usr/bin/promtool")
RATE_INTERVAL = "15s"  # Grafana's $__rate_interval for a 1 s scrape interval, rounded up


def load_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "dashboard_generate", REPO / "hack" / "dashboard" / "generate.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def grafana_to_promql(expr: str) -> str:
    """Substitute the dashboard's variables as Grafana does with "All" selected."""
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", ".*").replace("$job", ".*")


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.base}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:  # 400/422 carry the PromQL error in the body
            return json.loads(err.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        doc = self.get("/api/v1/query", query=expr)
        assert doc["status"] == "success", f"{expr}\n{doc.get('errorType')}: {doc.get('error')}"
        return doc["data"]["result"]


class Trainer(threading.Thread):
    """Feeds PrometheusTelemetry as the training loop would: a step every 50 ms, an evaluation every 20
    steps, a checkpoint every 10."""

    def __init__(self, port: int, namespace: str) -> None:
        super().__init__(daemon=True)
        from kubetune_trainer.telemetry import RunInfo
        from kubetune_trainer.telemetry.prometheus import PrometheusTelemetry

        self.telemetry = PrometheusTelemetry(port)
        self.info = RunInfo(
            job="ft", namespace=namespace, total_steps=100_000, start_step=0, spec={}, run_id="r1",
            first_start=False, samples_done=0, resumes=1, lost_steps=3,
        )  # fmt: skip
        self.stopped = threading.Event()

    def run(self) -> None:
        t = self.telemetry
        t.start(self.info)
        step = 0
        while not self.stopped.wait(0.05):
            step += 1
            t.log_step(
                step,
                {"epoch": step / 100, "samples": 32, "samples_per_second": 640.0, "loss": 2.3 / (1 + step / 100),
                 "learning_rate": 1e-3},
            )  # fmt: skip
            if step % 20 == 0:
                t.log_eval(step, {"eval_top1": min(1.0, step / 500), "eval_loss": 1.0, "eval_top5": 1.0})
            if step % 10 == 0:
                t.checkpoint_saved(step, 0.02 + (step % 30) / 1000)
        t.finish(0)


@pytest.fixture
def trainer(namespace: str) -> Iterator[tuple[Trainer, int]]:
    port = free_port()
    feeder = Trainer(port, namespace)
    feeder.start()
    yield feeder, port
    feeder.stopped.set()
    feeder.join(timeout=10)


@pytest.fixture
def dcgm_standin(namespace: str) -> Iterator[int]:
    """NOT dcgm-exporter: its two metric names and its pod/namespace labels, on a loopback port."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    labels = ["gpu", "UUID", "modelName", "Hostname", "container", "namespace", "pod"]
    util = Gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels, registry=registry)
    used = Gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels, registry=registry)
    for gpu, (u, mib) in enumerate([(87, 40_000), (91, 41_000)]):
        values = [
            str(gpu),
            f"GPU-{gpu:04d}",
            "NVIDIA H100 80GB HBM3",
            "node-0",
            "trainer",
            namespace,
            "ft-a1-0",
        ]
        util.labels(*values).set(u)
        used.labels(*values).set(mib)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port
    server.shutdown()
    server.server_close()


@pytest.fixture
def operator(kube: Any, crd: None, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    op = OperatorProcess(kube.kubeconfig, namespace, tmp_path / "operator.log").start()
    yield op
    op.stop()


def rules_from_chart(helm: Helm) -> dict[str, Any]:
    objs = helm.template({"prometheusRule": {"enabled": True}})
    rule = next(o for o in objs if o["kind"] == "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


@pytest.fixture
def prometheus_dir(tmp_path: Path, helm: Helm) -> Path:
    subprocess.run(["bash", str(PROMETHEUS_SH), "install"], check=True, capture_output=True, timeout=600)
    d = tmp_path / "prometheus"
    (d / "rules").mkdir(parents=True)
    (d / "rules" / "kubetune.yml").write_text(yaml.safe_dump(rules_from_chart(helm), sort_keys=False))
    return d


def drive_operator(kube: Any, core_v1: Any, namespace: str, node: str) -> None:
    """A job whose first pod is evicted (a preemption) and whose second fails (a failure)."""
    placement = {
        "nodeSelector": {"kubernetes.io/hostname": node},
        "tolerations": [dedicated_toleration(node)],
    }
    apply(kube, namespace, job_manifest("ft", runPolicy={"backoffLimit": 3}, **placement))

    def running(name: str) -> Any:
        def check() -> Any:
            pods = core_v1.list_namespaced_pod(namespace, field_selector=f"metadata.name={name}").items
            return (
                pods[0]
                if pods and pods[0].status.phase == "Running"
                else NotYet([p.status.phase for p in pods])
            )

        return wait_for(check, timeout=60, desc=f"pod {name} Running")

    running("ft-a1-0")
    core_v1.create_namespaced_pod_eviction(
        "ft-a1-0", namespace, {"metadata": {"name": "ft-a1-0", "namespace": namespace}}
    )
    running("ft-a2-0")
    patch_pod_terminated(core_v1, namespace, "ft-a2-0", 1, "Error", message="boom")
    running("ft-a3-0")


def test_promtool_checks_the_chart_rules(prometheus_dir: Path) -> None:
    out = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(prometheus_dir / "rules" / "kubetune.yml")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 4 rules found" in out.stdout, out.stdout


def test_dashboard_and_alerts_on_real_prometheus(
    kube: Any, core_v1: Any, namespace: str, kwok_node: Any, bound_volume: Any, operator: OperatorProcess,
    trainer: tuple[Trainer, int], dcgm_standin: int, prometheus_dir: Path,
) -> None:  # fmt: skip
    bound_volume(namespace, "ft-ckpt")
    drive_operator(kube, core_v1, namespace, kwok_node())

    port = free_port()
    targets = [
        f"trainer=127.0.0.1:{trainer[1]},pod=ft-a1-0",
        f"operator=127.0.0.1:{operator.metrics_port}",
        f"dcgm-standin=127.0.0.1:{dcgm_standin}",
    ]
    log = (prometheus_dir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        ["bash", str(PROMETHEUS_SH), "run", str(prometheus_dir), str(port), *targets],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        prom = Prometheus(port)

        def ready() -> Any:
            if proc.poll() is not None:
                raise AssertionError((prometheus_dir / "prometheus.log").read_text())
            try:
                ups = prom.query("up == 1")
            except OSError as err:
                return NotYet(err)
            return len(ups) == 3 or NotYet(ups)

        wait_for(ready, timeout=60, desc="Prometheus scraping trainer, operator and the DCGM stand-in")
        check_panels(prom, namespace)
        check_alerts(prom)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def check_panels(prom: Prometheus, namespace: str) -> None:
    gen = load_generator()
    for title, q in gen.queries():
        expr = grafana_to_promql(q.expr)
        if q.expect_data:
            wait_for(lambda e=expr: prom.query(e) or NotYet("no series"), timeout=60, desc=f"{title}: {expr}")
        else:
            prom.query(expr)  # valid PromQL that executes; data depends on the cluster
    # The GPU panels' join puts the FineTuneJob name on DCGM's series (the stand-in's, see module doc).
    for title, q in gen.queries():
        if "DCGM_" in q.expr:
            expr = grafana_to_promql(q.expr)
            result = wait_for(lambda e=expr: prom.query(e) or NotYet("no series"), timeout=30, desc=title)
            assert {(r["metric"]["job"], r["metric"]["namespace"], r["metric"]["pod"]) for r in result} == {
                ("ft", namespace, "ft-a1-0")
            }
    util = prom.query(grafana_to_promql(next(q.expr for _, q in gen.queries() if "GPU_UTIL" in q.expr)))
    assert float(util[0]["value"][1]) == pytest.approx(89.0)
    # Template variables (Grafana's label_values) resolve through the label-values API.
    ns = prom.get("/api/v1/label/namespace/values", **{"match[]": "kubetune_trainer_step"})["data"]
    jobs = prom.get(
        "/api/v1/label/job/values", **{"match[]": f'kubetune_trainer_step{{namespace=~"{namespace}"}}'}
    )
    assert namespace in ns and jobs["data"] == ["ft"]
    # Operator panels saw the scenario: one eviction, one failure.
    reasons = {r["metric"]["reason"] for r in prom.query("kubetune_preemptions_total")}
    assert reasons == {"EvictionByEvictionAPI"}
    assert prom.query("sum(kubetune_pod_failures_total)")[0]["value"][1] == "1"
    assert prom.query("sum(kubetune_recovery_seconds_count)")[0]["value"][1] != "0"


def check_alerts(prom: Prometheus) -> None:
    def evaluated() -> Any:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        done = len(rules) == 4 and all(not r["lastEvaluation"].startswith("0001") for r in rules)
        return rules if done else NotYet(rules)

    rules = wait_for(evaluated, timeout=30, desc="Prometheus evaluated the chart's 4 alerting rules")
    for rule in rules:
        assert rule["type"] == "alerting"
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        prom.query(rule["query"])


def test_helm_test_check_passes_against_a_running_operator(
    helm: Helm, operator: OperatorProcess, dcgm_standin: int
) -> None:
    """kwok never runs the helm test pod (test_cluster.py), so run its script here: against a real
    operator's metrics endpoint it passes; against an endpoint without the operator's series it fails."""
    objs = helm.template({}, "kt", "kubetune-system")
    pod = next(
        o for o in objs if o["kind"] == "Pod" and o["metadata"]["annotations"]["helm.sh/hook"] == "test"
    )
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    script = container["args"][0]
    service_url = "http://kt-kubetune.kubetune-system.svc:8080"
    assert service_url in script

    def run(port: int) -> subprocess.CompletedProcess[str]:
        local = script.replace(service_url, f"http://127.0.0.1:{port}")
        return subprocess.run([sys.executable, "-c", local], capture_output=True, text=True, timeout=120)

    ok = run(operator.metrics_port)
    assert ok.returncode == 0 and "ok:" in ok.stdout, ok.stdout + ok.stderr
    bad = run(dcgm_standin)
    assert bad.returncode == 1 and "lacks ['kubetune_jobs', 'kubetune_reconcile_seconds']" in bad.stderr
