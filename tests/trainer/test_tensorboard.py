"""TensorBoard as TensorBoard reads it: one unbroken record per job however often it was stopped, the
misclassified-image grid of a real image folder, and nothing at all when it is off."""

from __future__ import annotations

import io
import random
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from kubetune_trainer.telemetry.tensorboard import pick_tensors, run_hparams, step_tags

from .helpers import Job, tiny_spec, write_digits

pytestmark = pytest.mark.trainer

TOTAL, EVERY = 24, 4
SPEC = tiny_spec(
    data={"syntheticSamples": 96, "valFraction": 0.25},  # 72 train = 9 steps per epoch: evals at 9, 18, 24
    training={"maxSteps": TOTAL, "batchSize": 8, "gradClip": 1.0, "warmupSteps": 3},
    checkpoint={"everySteps": EVERY},
)
WALL_CLOCK_TAGS = {"train/samples_per_second"}


def board(job: Job) -> EventAccumulator:
    acc = EventAccumulator(str(job.ckpt / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0,
                                                                           "images": 0, "tensors": 0})  # fmt: skip
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tags_of(event: Any) -> list[str]:
    return [v.tag for v in event.summary.value][:1]


def hparams_of(acc: EventAccumulator) -> dict[str, Any]:
    content = acc.PluginTagToContent("hparams")
    data = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_preempted_job_has_one_unbroken_record_equal_to_an_uninterrupted_one(
    job_factory: Callable[..., Job],
) -> None:
    ref = job_factory(SPEC, "ref")
    assert ref.run() == 0, ref.log_text()
    want = scalars(board(ref))
    assert {"train/loss", "train/lr", "train/samples_per_second", "train/grad_norm"} <= want.keys(), (
        want.keys()
    )
    assert {"eval/top1", "eval/top5", "eval/loss", "eval/best_top1"} <= want.keys(), want.keys()
    assert [s for s, _ in want["train/loss"]] == list(range(1, TOTAL + 1))
    assert [s for s, _ in want["eval/top1"]] == [9, 18, 24]
    best = [v for _, v in want["eval/best_top1"]]
    assert best == [max(v for _, v in want["eval/top1"][: i + 1]) for i in range(3)]

    job = job_factory(SPEC, "interrupted")
    rng = random.Random(7)
    proc = job.start()  # 1) SIGTERM mid-epoch: checkpoint at the step reached
    assert job.interrupt_at(proc, rng.randint(2, 5), signal.SIGTERM) == 143, job.log_text()
    first_stop = job.progress()["step"]
    # 2) SIGKILL past the first evaluation while a checkpoint is still being written (the write sleeps
    # before its rename): the steps logged since the last durable one are trained and logged again.
    proc = job.start(KUBETUNE_TEST_SLOW_SAVE_SECONDS="3")
    assert job.interrupt_at(proc, 11, signal.SIGKILL) == -signal.SIGKILL
    killed_at = job.progress()["step"]
    proc = job.start()  # 3) SIGTERM again, then run to the end
    assert job.interrupt_at(proc, killed_at + rng.randint(2, 4), signal.SIGTERM) == 143, job.log_text()
    assert job.run() == 0, job.log_text()
    files = sorted((job.ckpt / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 4 and first_stop < killed_at, files
    on_disk = [e.step for f in files for e in EventFileLoader(str(f)).Load() if tags_of(e) == ["train/loss"]]
    assert len(on_disk) > TOTAL, "the kill left steps that were redone: the files hold them twice"

    acc = board(job)
    got = scalars(acc)
    assert got.keys() == want.keys()
    for tag, points in got.items():
        steps = [s for s, _ in points]
        assert steps == sorted(set(steps)), (tag, steps)  # strictly increasing: none twice, none backwards
        assert steps == [s for s, _ in want[tag]], (tag, steps)
        if tag not in WALL_CLOCK_TAGS:
            assert points == want[tag], tag

    tags = acc.Tags()
    hists = set(tags["histograms"])
    assert {"weights/fc.weight", "weights/fc.bias", "gradients/fc.weight"} <= hists, hists
    assert len(hists) <= 2 * 6, hists  # the classifier and at most 4 other tensors, weights and grads
    assert [e.step for e in acc.Histograms("weights/fc.weight")] == [9, 18, 24]
    assert [e.step for e in acc.Images("eval/misclassified")] == [9, 18, 24]
    assert {"job/spec/text_summary", "eval/misclassified_labels/text_summary"} <= set(tags["tensors"]), tags[
        "tensors"
    ]
    (spec_text,) = acc.Tensors("job/spec/text_summary")  # written once, at the first start
    assert "test_resnet" in spec_text.tensor_proto.string_val[0].decode()
    assert tags["graph"], "the model graph of the first start"
    hp = hparams_of(acc)
    assert hp["model.name"] == "test_resnet" and hp["training.gradClip"] == 1.0, hp
    assert hp["training.batchSize"] == 8 and "training.maxSteps" not in hp  # run-defining fields only
    assert not [p for p in (job.ckpt / "tensorboard").iterdir() if p.is_dir()], "one run: no sub-runs"


@pytest.mark.timeout(300)
def test_restart_without_a_checkpoint_starts_the_record_over(job_factory: Callable[..., Job]) -> None:
    job = job_factory(tiny_spec(training={"maxSteps": 8}, checkpoint={"everySteps": 4}))
    proc = job.start(KUBETUNE_TEST_SLOW_SAVE_SECONDS="30")  # the first checkpoint never lands
    assert job.interrupt_at(proc, 5, signal.SIGKILL) == -signal.SIGKILL
    assert not list(job.ckpt.glob("checkpoints/step-*.pt"))
    assert job.run() == 0, job.log_text()
    acc = board(job)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    # The restart from step 0 wrote the spec again (the job may have changed); the purge drops the first.
    # The classic accumulator purges only scalars, histograms and images; the one TensorBoard serves from
    # purges text too.
    served = plugin_event_accumulator.EventAccumulator(str(job.ckpt / "tensorboard"), {"tensors": 0})
    served.Reload()
    assert [e.step for e in served.Tensors("job/spec/text_summary")] == [0]
    assert [e.step for e in served.Tensors("train/loss")] == list(range(1, 9))


@pytest.mark.timeout(300)
def test_misclassified_digits_grid_is_denormalised_and_labelled(
    tmp_path: Path, job_factory: Callable[..., Job]
) -> None:
    spec = {
        "model": {"name": "test_resnet"},
        "data": {"path": str(write_digits(tmp_path / "digits")), "imageSize": 32, "valFraction": 0.2},
        "training": {"maxSteps": 3, "batchSize": 16},
        "metrics": {"port": 0},
    }
    job = job_factory(spec, "digits")
    assert job.run() == 0, job.log_text()
    acc = board(job)
    (image,) = acc.Images("eval/misclassified")
    assert image.step == 3
    from PIL import Image

    grid = Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")
    (labels,) = acc.Tensors("eval/misclassified_labels/text_summary")
    rows = [r.split("|")[1:4] for r in labels.tensor_proto.string_val[0].decode().splitlines()[2:]]
    assert len(rows) == 16, rows  # three steps in, far more than 16 of 360 digits are wrong
    digits = {str(i) for i in range(10)}
    assert all(p.strip() != t.strip() and {p.strip(), t.strip()} <= digits for _, p, t in rows), rows
    truth = [t.strip() for _, _, t in rows]
    assert truth == sorted(truth) and len(set(truth)) >= 4, truth  # spread over the classes, by class
    # 4 x 4 tiles of a 32 px digit upscaled to 96 px, with a 26 px caption under each.
    assert grid.size == (4 * 98 + 2, 4 * 124 + 2), grid.size
    tile = np.asarray(grid.crop((2, 2, 98, 98)), dtype=np.int16)
    # The grey digits come back grey: channel-wise normalisation undone (left in, R, G and B would differ).
    assert int((tile.max(axis=2) - tile.min(axis=2)).max()) <= 2
    assert tile.max() > 200 and tile.min() < 30


@pytest.mark.timeout(240)
def test_disabled_writes_no_tensorboard_files(job_factory: Callable[..., Job]) -> None:
    job = job_factory(tiny_spec(training={"maxSteps": 4}, tensorboard={"enabled": False}))
    assert job.run() == 0, job.log_text()
    assert not (job.ckpt / "tensorboard").exists()
    assert not list(job.root.rglob("events.out.tfevents.*"))


def test_step_tags_split_the_learning_rate_per_group() -> None:
    assert ("learning_rate", "train/lr") in step_tags({"loss": 1.0, "learning_rate": 0.1})
    tags = dict(step_tags({"learning_rate": 0.1, "learning_rate/group0": 0.1, "learning_rate/group1": 0.2}))
    assert "learning_rate" not in tags
    assert (
        tags["learning_rate/group0"] == "train/lr/group0"
        and tags["learning_rate/group1"] == "train/lr/group1"
    )


def test_histograms_cover_the_classifier_and_a_bounded_rest() -> None:
    import timm

    model = timm.create_model("resnet18", num_classes=3)
    names = [n for n, _ in pick_tensors(model)]
    assert names[:2] == ["fc.weight", "fc.bias"] and len(names) == 6, names
    assert names[2] == "conv1.weight", names  # spread from the first layer on
    for p in model.parameters():
        p.requires_grad = False
    model.fc.weight.requires_grad = True
    assert [n for n, _ in pick_tensors(model)] == ["fc.weight"]


def test_hparams_are_the_run_defining_fields() -> None:
    spec = {
        "model": {"name": "m", "pretrained": False, "weights": None, "freeze": ["stem", "stages.0"]},
        "training": {"learningRate": 0.001, "maxSteps": 10, "ema": True},
    }
    hp = run_hparams(spec)
    assert hp == {
        "model.name": "m",
        "model.pretrained": "false",
        "model.freeze": "[stem, stages.0]",
        "training.learningRate": 0.001,
        "training.ema": "true",
    }
