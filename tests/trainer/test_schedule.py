"""The LR schedule (timm's, per optimizer update, behind components.Schedule): each training.scheduler has
the promised shape; apart from plateau it is a function of the update count, so a resume needs only that
count (plateau adds what it learned from the evaluations), and a resume with a larger total stretches it."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest
import torch
from torch import nn

from kubetune_trainer.components import PLATEAU_PATIENCE, Schedule, warmup_steps
from kubetune_trainer.config import TrainingConfig

pytestmark = pytest.mark.unit

PEAK = 0.1
SCHEDULERS = ("cosine", "step", "multistep", "poly", "tanh", "plateau", "constant")


def make(kind: str, total: int, warmup: int = 0, **fields: Any) -> tuple[Schedule, torch.optim.Optimizer]:
    t = dataclasses.replace(TrainingConfig(), scheduler=kind, learningRate=PEAK, **fields)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=PEAK)
    return Schedule(opt, t, total, warmup), opt


def lr(opt: torch.optim.Optimizer) -> float:
    return float(opt.param_groups[0]["lr"])


def run(sched: Schedule, opt: torch.optim.Optimizer, start: int, stop: int) -> list[float]:
    """The rates updates start+1 .. stop use (the loop calls step_update(n) after update n)."""
    out = []
    for n in range(start, stop):
        out.append(lr(opt))
        sched.step_update(n + 1)
    return out


def curve(kind: str, total: int, warmup: int = 0, **fields: Any) -> list[float]:
    sched, opt = make(kind, total, warmup, **fields)
    return [*run(sched, opt, 0, total), lr(opt)]  # and the rate after the last update


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_every_scheduler_warms_up_linearly_from_the_warmup_rate(kind: str) -> None:
    rates = curve(kind, 40, warmup=4, warmupLearningRate=0.02)
    assert rates[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, PEAK])


def test_cosine_decays_to_the_minimum_over_the_updates_after_warmup() -> None:
    rates = curve("cosine", 104, warmup=4, minLearningRate=0.001)
    after = rates[4:]
    assert after[0] == PEAK and after[-1] == pytest.approx(0.001)
    assert after[50] == pytest.approx((PEAK + 0.001) / 2)  # halfway through the decay
    assert all(a > b for a, b in itertools.pairwise(after))
    assert curve("cosine", 10)[-1] == 0.0  # minLearningRate's default


@pytest.mark.parametrize("kind", ["step", "multistep"])
def test_step_is_a_tenth_at_half_and_a_hundredth_at_three_quarters(kind: str) -> None:
    rates = curve(kind, 100)
    assert [rates[s] / PEAK for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with_warmup = curve(kind, 104, warmup=4)  # shares of the updates after warmup
    assert [with_warmup[s] / PEAK for s in (53, 54, 78, 79)] == pytest.approx([1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("kind", ["poly", "tanh"])
def test_poly_and_tanh_fall_from_the_peak_to_the_minimum(kind: str) -> None:
    rates = curve(kind, 50, minLearningRate=0.001)
    assert rates[0] == pytest.approx(PEAK, rel=1e-3) and rates[-1] == pytest.approx(0.001)
    assert all(a >= b for a, b in itertools.pairwise(rates))
    assert rates[40] < 0.5 * PEAK


@pytest.mark.parametrize("kind", ["constant", "plateau"])
def test_constant_and_plateau_without_evaluations_stay_flat(kind: str) -> None:
    assert set(curve(kind, 30, warmup=3)[3:]) == {PEAK}


def test_plateau_cuts_by_ten_after_patience_evaluations_without_better_eval_loss() -> None:
    sched, opt = make("plateau", 1000, warmup=2, minLearningRate=1e-4)
    run(sched, opt, 0, 5)
    losses = [1.0, 0.9] + [0.95] * PLATEAU_PATIENCE  # an improvement, then PATIENCE without
    for loss in losses:
        sched.step_eval({"eval_loss": loss, "eval_top1": 0.5})
    assert lr(opt) == PEAK  # tolerated: torch ReduceLROnPlateau(patience=10) cuts on the 11th
    sched.step_eval({"eval_loss": 0.95, "eval_top1": 0.5})
    assert lr(opt) == pytest.approx(PEAK * 0.1)
    for _ in range(3 * (PLATEAU_PATIENCE + 1)):
        sched.step_eval({"eval_loss": 0.95, "eval_top1": 0.5})
    assert lr(opt) == pytest.approx(1e-4)  # minLearningRate is its floor
    assert run(sched, opt, 5, 10) == [pytest.approx(1e-4)] * 5  # updates do not move it


def test_plateau_ignores_evaluations_during_warmup() -> None:
    sched, opt = make("plateau", 100, warmup=30)
    for n in range(20):
        sched.step_eval({"eval_loss": 1.0 + n})
        sched.step_update(n + 1)
    assert lr(opt) == pytest.approx(PEAK * 20 / 30)
    assert sched.state_dict()["plateau"]["num_bad_epochs"] == 0


def evaluate(sched: Schedule, n: int) -> None:
    """A fixed, mostly non-improving eval_loss sequence, keyed by the update count."""
    sched.step_eval({"eval_loss": 1.0 if n % 7 else 2.0 - n / 100})


@pytest.mark.parametrize("kind", SCHEDULERS)
def test_state_round_trip_mid_run_continues_identically(kind: str) -> None:
    total, mid = 120, 50

    def drive(sched: Schedule, opt: torch.optim.Optimizer, start: int, stop: int) -> list[float]:
        out = []
        for n in range(start, stop):
            out += run(sched, opt, n, n + 1)
            if (n + 1) % 3 == 0:
                evaluate(sched, n + 1)
        return out

    ref, ref_opt = make(kind, total, warmup=5, minLearningRate=1e-5)
    expected = drive(ref, ref_opt, 0, total)

    first, first_opt = make(kind, total, warmup=5, minLearningRate=1e-5)
    drive(first, first_opt, 0, mid)
    saved, saved_opt = first.state_dict(), first_opt.state_dict()
    assert "t_initial" not in str(saved) and "decay_t" not in str(saved)  # totals come from the spec

    resumed, resumed_opt = make(kind, total, warmup=5, minLearningRate=1e-5)
    resumed_opt.load_state_dict(saved_opt)
    resumed.load_state_dict(saved)
    assert drive(resumed, resumed_opt, mid, total) == expected[mid:]  # bitwise equal floats
    if kind == "plateau":
        assert min(expected) < PEAK / 5  # the evaluations did cut it, before and after the resume


def test_plateau_state_survives_a_resume_before_the_optimizer_is_loaded() -> None:
    """The schedule's own state carries plateau's rates, whatever order the loop loads things in."""
    sched, opt = make("plateau", 100)
    run(sched, opt, 0, 10)
    for loss in [1.0] + [2.0] * (PLATEAU_PATIENCE + 1):
        sched.step_eval({"eval_loss": loss})
    resumed, resumed_opt = make("plateau", 100)
    resumed.load_state_dict(sched.state_dict())
    assert lr(resumed_opt) == pytest.approx(PEAK * 0.1)
    assert resumed.state_dict() == sched.state_dict()


def test_extending_the_total_on_resume_stretches_cosine() -> None:
    short, short_opt = make("cosine", 100, warmup=10)
    run(short, short_opt, 0, 40)
    state = short.state_dict()

    longer, longer_opt = make("cosine", 200, warmup=10)
    longer_opt.load_state_dict(short_opt.state_dict())
    longer.load_state_dict(state)
    fresh = curve("cosine", 200, warmup=10)
    assert run(longer, longer_opt, 40, 200) == fresh[40:200]  # the 200-update schedule from update 41 on
    assert fresh[40] > curve("cosine", 100, warmup=10)[40]
    assert lr(longer_opt) == 0.0


def test_extending_the_total_moves_the_step_milestones() -> None:
    short, opt = make("step", 100)
    run(short, opt, 0, 60)
    assert lr(opt) == pytest.approx(PEAK * 0.1)
    longer, longer_opt = make("step", 200)
    longer.load_state_dict(short.state_dict())
    assert lr(longer_opt) == PEAK  # 60 of 200 is before the first milestone


def test_warmup_epochs_convert_to_steps() -> None:
    t = TrainingConfig()
    assert warmup_steps(dataclasses.replace(t, warmupSteps=7), 30) == 7
    assert warmup_steps(dataclasses.replace(t, warmupEpochs=0.5), 30) == 15
    assert warmup_steps(dataclasses.replace(t, warmupEpochs=0.1), 30) == 3  # not 4 from 3.0000000000000004
    assert warmup_steps(dataclasses.replace(t, warmupEpochs=0.01), 30) == 1
    assert warmup_steps(t, 30) == 0


def test_warmup_longer_than_training_still_builds() -> None:
    assert curve("cosine", 5, warmup=10)[:3] == pytest.approx([0.0, 0.01, 0.02])


def test_layer_scales_follow_the_schedule() -> None:
    """timm's schedulers scale each group by its lr_scale (layerDecay's groups), warmup included."""
    t = dataclasses.replace(TrainingConfig(), scheduler="cosine", learningRate=PEAK)
    params = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr_scale": 0.25}, {"params": [params[1]]}], lr=PEAK)
    sched = Schedule(opt, t, 20, 4)
    sched.step_update(4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([PEAK * 0.25, PEAK])
