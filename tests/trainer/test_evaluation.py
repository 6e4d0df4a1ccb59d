"""Evaluation: the report's numbers, eval/step-N.json at evaluation.everySteps, the best model in best/
(loadable with timm, remembered across a SIGTERM) and training.earlyStopping (same step after a resume)."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer import config as c
from kubetune_trainer import data as data_mod
from kubetune_trainer import evaluate as eval_mod
from kubetune_trainer import model as model_mod
from kubetune_trainer.checkpoint import Checkpointer
from kubetune_trainer.evaluate import (
    STALE_EVALS,
    build_report,
    early_stop_reached,
    evaluate,
    improves,
    record,
)
from kubetune_trainer.runtime import Runtime

from .helpers import Job, tiny_spec
from .test_export import load_the_timm_way

pytestmark = pytest.mark.trainer


# -- the report (pure) ------------------------------------------------------------------------------------

CONFUSION = [  # rows: truth, columns: prediction
    [3, 1, 0],
    [0, 2, 2],
    [1, 0, 1],
]


def test_report_of_a_known_confusion_matrix() -> None:
    r = build_report(CONFUSION, loss_sum=5.0, top5_correct=9, top_k=3, classes=["ant", "bee", "cat"])
    assert (r.count, r.top1, r.top5, r.loss, r.top_k) == (10, 0.6, 0.9, 0.5, 3)
    by = {p["class"]: p for p in r.per_class}
    assert by["ant"] == {
        "class": "ant",
        "support": 4,
        "predicted": 4,
        "precision": 0.75,
        "recall": 0.75,
        "accuracy": 0.8,  # 3 right as ant + 4 right as not-ant, of 10
    }
    assert (by["bee"]["precision"], by["bee"]["recall"], by["bee"]["accuracy"]) == (2 / 3, 0.5, 0.7)
    assert (by["cat"]["precision"], by["cat"]["recall"], by["cat"]["accuracy"]) == (1 / 3, 0.5, 0.7)
    assert r.metrics() == {"eval_loss": 0.5, "eval_top1": 0.6, "eval_top5": 0.9}
    doc = r.to_doc(step=7, epoch=0)
    assert doc["confusion"] == CONFUSION and doc["classes"] == ["ant", "bee", "cat"] and doc["step"] == 7


def test_undefined_ratios_are_null_and_extra_outputs_are_named_by_index() -> None:
    r = build_report([[2, 0], [0, 0]], loss_sum=0.0, top5_correct=2, top_k=2, classes=["only"])
    assert [p["class"] for p in r.per_class] == ["only", "1"]
    assert r.per_class[1]["precision"] is None and r.per_class[1]["recall"] is None
    assert r.per_class[1]["accuracy"] == 1.0


class Fixed(torch.nn.Module):
    """A 'model' whose inputs are its logits."""

    num_classes = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


LOGITS = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 2, 1], [1, 0, 2]])
TARGETS = torch.tensor([0, 1, 2, 2])


def test_evaluate_counts_the_confusion_matrix_and_caps_top_k() -> None:
    """3 classes: top-5 is top-3 (always right); the matrix is what argmax says."""
    data = list(zip(LOGITS, TARGETS, strict=True))
    r = evaluate(Fixed(), data, Runtime(), 2, 0, contextlib.nullcontext)  # type: ignore[arg-type]
    assert r.confusion == [[1, 0, 0], [0, 1, 0], [0, 1, 1]] and r.top_k == 3 and r.top5 == 1.0
    assert r.loss == pytest.approx(torch.nn.functional.cross_entropy(LOGITS, TARGETS).item())


def test_many_classes_keep_per_class_numbers_without_the_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    data = list(zip(LOGITS, TARGETS, strict=True))
    full = evaluate(Fixed(), data, Runtime(), 2, 0, contextlib.nullcontext)  # type: ignore[arg-type]
    monkeypatch.setattr(eval_mod, "CONFUSION_MAX_CLASSES", 2)
    small = evaluate(Fixed(), data, Runtime(), 2, 0, contextlib.nullcontext)  # type: ignore[arg-type]
    assert small.confusion is None and small.per_class == full.per_class
    assert (small.top1, small.top5, small.loss) == (full.top1, full.top5, full.loss)


def test_best_and_early_stopping_are_folded_into_the_metrics() -> None:
    assert improves(0.5, None, "max") and improves(0.4, 0.5, "min") and not improves(0.5, 0.5, "max")
    assert not improves(0.55, 0.5, "max", min_delta=0.1) and improves(0.61, 0.5, "max", min_delta=0.1)
    best = c.BestConfig(metric="loss")
    stop = c.EarlyStoppingConfig(metric="top1", patience=2, minDelta=0.05)
    m: dict[str, Any] = {}

    def report(top1: float, loss: float) -> Any:
        right = round(top1 * 100)
        return build_report([[right, 100 - right], [0, 0]], loss * 100, 100, 2, ["a", "b"])

    assert record(m, report(0.5, 2.0), 10, best, stop)  # first: best, counter 0
    assert not record(m, report(0.52, 2.5), 20, best, stop)  # no better loss; top1 +0.02 < minDelta
    assert m[STALE_EVALS] == 1 and not early_stop_reached(m, stop)
    assert record(m, report(0.53, 1.0), 30, best, stop)
    assert (m["best_metric"], m["best_metric_name"], m["best_step"]) == (1.0, "loss", 30)
    assert m[STALE_EVALS] == 2 and early_stop_reached(m, stop) and not early_stop_reached(m, None)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"training": {"earlyStopping": {"patience": 0}}}, "training.earlyStopping.patience: must be >= 1"),
        ({"training": {"earlyStopping": {"minDelta": -1}}}, "training.earlyStopping.minDelta: must be >= 0"),
        ({"checkpoint": {"best": {"mode": "maximum"}}}, "checkpoint.best.mode: must be one of max, min"),
        ({"evaluation": {"everySteps": "often"}}, "evaluation.everySteps: must be"),
    ],
)
def test_bad_values_name_the_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(c.ConfigError, match=message):
        c.parse_spec({"model": {"name": "test_resnet"}, "data": {"format": "synthetic"}, **spec})


def test_best_without_a_validation_split_is_a_config_error(tmp_path: Path) -> None:
    from kubetune_trainer.loop import Trainer

    spec = tiny_spec(data={"valFraction": 0.0}, checkpoint={"best": {}})
    with pytest.raises(c.ConfigError, match=r"checkpoint\.best: needs a validation split"):
        Trainer(c.parse_spec(spec), tmp_path, Runtime())


@pytest.mark.parametrize("section", ["checkpoint", "training"])
def test_top5_with_five_classes_or_fewer_is_a_config_error(tmp_path: Path, section: str) -> None:
    """top-5 of 5 classes is always 1: early stopping would stop after `patience` evaluations whatever
    the training does, and best/ would keep the first model."""
    from kubetune_trainer.loop import Trainer

    key = {"checkpoint": "best", "training": "earlyStopping"}[section]
    spec = tiny_spec(model={"numClasses": 5}, **{section: {key: {"metric": "top5"}}})
    with pytest.raises(c.ConfigError, match=rf"{section}\.{key}\.metric: top5 is always 1 with 5 classes"):
        Trainer(c.parse_spec(spec), tmp_path, Runtime())


def test_a_non_finite_metric_never_improves_nor_pins_the_best() -> None:
    nan, inf = float("nan"), float("inf")
    assert not eval_mod.improves(nan, None, "min") and not eval_mod.improves(inf, None, "min")
    assert not eval_mod.improves(nan, 0.5, "max")
    assert eval_mod.improves(0.7, 0.5, "max") and eval_mod.improves(0.2, None, "min")


def test_a_stop_right_after_the_last_step_keeps_its_evaluation_in_the_checkpoint(tmp_path: Path) -> None:
    """SIGTERM between the last step and its evaluation checkpoints that step without the evaluation; the
    resumed attempt evaluates it and must save the step again, or a later extension (more maxSteps) would
    continue without that evaluation's best, early-stopping count and plateau state."""
    from kubetune_trainer.loop import Trainer
    from kubetune_trainer.stop import STOP

    spec = tiny_spec(training={"maxSteps": 5}, checkpoint={"everySteps": 0, "best": {"metric": "loss"}})
    cfg = c.parse_spec(spec)
    first = Trainer(cfg, tmp_path, Runtime())
    steps = first.steps()
    try:
        for step in steps:
            if step == 5:
                STOP.set()  # as the SIGTERM handler does, after the last step's update
        assert first.outcome is not None and first.outcome.reason == "Preempted"
    finally:
        STOP.clear()
        first.close(143)
    saved = torch.load(tmp_path / "checkpoints" / "step-00000005.pt", weights_only=False)
    assert saved["step"] == 5 and saved["eval_step"] != 5  # stopped before evaluating
    second = Trainer(cfg, tmp_path, Runtime())
    try:
        assert second.run().reason == "Completed"
    finally:
        second.close(0)
    saved = torch.load(tmp_path / "checkpoints" / "step-00000005.pt", weights_only=False)
    assert saved["eval_step"] == 5 and saved["metrics"][eval_mod.BEST_STEP] == 5


# -- through the CLI --------------------------------------------------------------------------------------

EVERY = 4
PATIENCE = 2
STOP_AT = EVERY * (PATIENCE + 1)  # minDelta 1000: only the first evaluation ever improves
SPEC = tiny_spec(
    data={"syntheticSamples": 200},  # 180 training samples: 22 steps an epoch, no epoch end before STOP_AT
    training={"maxSteps": 30, "earlyStopping": {"metric": "loss", "patience": PATIENCE, "minDelta": 1000}},
    checkpoint={"everySteps": 3, "best": {"metric": "loss"}},
    evaluation={"everySteps": EVERY},
)


def evals(job: Job) -> dict[int, dict[str, Any]]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (job.ckpt / "eval").glob("*.json")}


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Job:
    job = Job(tmp_path_factory.mktemp("ref"), SPEC, "ref")
    assert job.run() == 0, job.log_text()
    return job


def test_eval_reports_at_every_steps_and_early_stop(ref: Job) -> None:
    reports = evals(ref)
    assert sorted(reports) == [EVERY, 2 * EVERY, STOP_AT]
    r = reports[STOP_AT]
    assert r["count"] == 20 and len(r["confusion"]) == len(r["perClass"]) == 10 and r["topK"] == 5
    assert sum(map(sum, r["confusion"])) == 20
    assert not list((ref.ckpt / "eval").glob(".*"))  # written atomically: no temp files left
    term = ref.termination()
    assert term["reason"] == "EarlyStopped" and term["step"] == STOP_AT < term["totalSteps"]
    assert f"stopped early at step {STOP_AT}: eval loss did not improve" in term["message"]
    assert term["eval"] == {
        "step": STOP_AT,
        **{k: pytest.approx(r[k], abs=1e-6) for k in ("top1", "top5", "loss")},
    }
    assert ref.progress()["finished"] and (ref.ckpt / "final" / "model.safetensors").is_file()


def test_best_is_exported_loadable_and_kept(ref: Job) -> None:
    reports = evals(ref)
    best_step = min(reports, key=lambda s: (reports[s]["loss"], s))
    term = ref.termination()
    assert (term["bestStep"], term["bestMetricName"]) == (best_step, "loss")
    assert term["bestMetric"] == pytest.approx(reports[best_step]["loss"], abs=1e-6)
    best = ref.ckpt / "best"
    info = json.loads((best / "best.json").read_text())
    assert info == {"metric": "loss", "step": best_step, "value": reports[best_step]["loss"]}
    # keepLast (2) pruned the checkpoints but not best/
    assert len(list((ref.ckpt / "checkpoints").glob("step-*.json"))) == 2

    model, _, cfg = load_the_timm_way(best)
    assert cfg["label_names"] == [f"class_{i}" for i in range(10)]
    jc = c.parse_spec(SPEC)
    ds = data_mod.build_datasets(jc.data, None, model_mod.data_config("test_resnet"), jc.training.seed)
    assert ds.val is not None
    again = evaluate(model, ds.val, Runtime(), 8, 0, contextlib.nullcontext)
    assert again.loss == pytest.approx(info["value"], rel=1e-5)
    assert again.confusion == reports[best_step]["confusion"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_best_and_early_stop_survive_sigterm(ref: Job, job_factory: Callable[..., Job]) -> None:
    job = job_factory(SPEC, "resumed")
    proc = job.start()
    assert job.interrupt_at(proc, EVERY + 1, signal.SIGTERM) == 143, job.log_text()
    assert job.termination()["reason"] == "Preempted" and (job.ckpt / "best" / "best.json").is_file()
    assert job.run() == 0, job.log_text()
    a, b = ref.termination(), job.termination()
    keys = ("reason", "step", "eval", "bestMetric", "bestMetricName", "bestStep")
    assert {k: b[k] for k in keys} == {k: a[k] for k in keys}
    for d in ("best", "final"):
        for f in ("model.safetensors", "config.json"):
            assert (job.ckpt / d / f).read_bytes() == (ref.ckpt / d / f).read_bytes(), (d, f)
    assert evals(job) == evals(ref)

    # Started again, the finished run says it stopped early and changes nothing.
    assert job.run() == 0, job.log_text()
    again = job.termination()
    assert again["reason"] == "EarlyStopped" and again["step"] == STOP_AT
    assert again["message"].startswith(f"already stopped early at step {STOP_AT}")
    assert again["bestStep"] == a["bestStep"]


def test_keep_last_never_touches_best(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, c.CheckpointConfig(keepLast=2))
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "step-00000001.json").write_text("{}")  # a name keepLast would match
    for step in (1, 2, 3):
        ckpt.save_sync(step, {"step": step, "epoch": 0})
    assert [p.name for p in sorted(ckpt.dir.glob("*.json"))] == ["step-00000002.json", "step-00000003.json"]
    assert (tmp_path / "best" / "step-00000001.json").is_file()
