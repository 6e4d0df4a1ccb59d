"""training.optimizer and friends through timm's create_optimizer_v2 (names, weight-decay groups, layer
decay, frozen parameters), the EMA decay, channels_last, and torch.compile leaving checkpoints loadable
without it. The schedule's own tests are in test_schedule.py."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import timm.optim
import torch
from torch import nn
from torch._dynamo import OptimizedModule

from kubetune_trainer import cli
from kubetune_trainer.components import (
    Schedule,
    build_components,
    build_optimizer,
    check_optimizer,
    check_optimizer_args,
)
from kubetune_trainer.config import ConfigError, TrainingConfig
from kubetune_trainer.model import compile_model, freeze, match_state_layout, memory_format, place, unwrap
from kubetune_trainer.runtime import Runtime
from kubetune_trainer.step import StepRunner

from .helpers import Job, tiny_spec

pytestmark = pytest.mark.unit

NEEDS_MORE_THAN_A_STEP = {
    "adahessian": "needs loss.backward(create_graph=True)",
    "kron": "without opt_einsum its preconditioner einsum asks for ~100 GB on test_resnet",
    "kronc": "same as kron",
    "kronw": "same as kron",
}
"""Optimizers that build but whose step this test does not take (the trainer's plain backward)."""


def cfg(**fields: Any) -> TrainingConfig:
    return dataclasses.replace(TrainingConfig(), **fields)


def resnet(seed: int = 0, num_classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes)


def batch(seed: int = 0, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    x, y = batch(seed)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def param_names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# -- optimizer -----------------------------------------------------------------------------------------
def test_adamw_and_sgd_mean_what_they_meant() -> None:
    adamw = build_optimizer(resnet(), cfg(optimizer="adamw"))
    assert type(adamw) is torch.optim.AdamW
    sgd = build_optimizer(resnet(), cfg(optimizer="sgd"))
    assert type(sgd) is torch.optim.SGD
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in sgd.param_groups)
    momentum = build_optimizer(resnet(), cfg(optimizer="momentum", momentum=0.8))
    assert all(not g["nesterov"] and g["momentum"] == 0.8 for g in momentum.param_groups)


def test_weight_decay_is_zero_for_norm_and_bias_parameters() -> None:
    model = resnet()
    opt = build_optimizer(model, cfg(weightDecay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for g in opt.param_groups:
        for p in g["params"]:
            seen.append(names[id(p)])
            assert g["weight_decay"] == (0.0 if p.ndim <= 1 else 0.05), names[id(p)]
    assert sorted(seen) == sorted(names.values())  # every parameter once
    assert any(n.startswith("bn") or ".bn" in n for n in seen)


def test_frozen_parameters_stay_out_of_every_optimizer_group() -> None:
    for layer_decay in (None, 0.7):
        model = resnet()
        freeze(model, "backbone")
        for decay in (0.0, 0.05):
            opt = build_optimizer(model, cfg(weightDecay=decay, layerDecay=layer_decay))
            params = [p for g in opt.param_groups for p in g["params"]]
            assert param_names(model, params) == {n for n, p in model.named_parameters() if p.requires_grad}
            assert param_names(model, params) == {"fc.weight", "fc.bias"}


def test_layer_decay_gives_per_layer_learning_rates() -> None:
    model = resnet()
    t = cfg(layerDecay=0.5, learningRate=0.1, scheduler="constant", weightDecay=0.05)
    opt = build_optimizer(model, t)
    Schedule(opt, t, 10, 0)
    scales = {round(g["lr_scale"], 6) for g in opt.param_groups}
    assert len(scales) >= 3 and max(scales) == 1.0
    by_name: dict[str, dict[str, Any]] = {}
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(0.1 * g["lr_scale"])  # the scheduler applies lr_scale
        assert g["weight_decay"] == (0.0 if all(p.ndim <= 1 for p in g["params"]) else 0.05)
        for n in param_names(model, g["params"]):
            by_name[n] = g
    assert by_name["fc.weight"]["lr_scale"] == 1.0
    assert by_name["conv1.0.weight"]["lr_scale"] == min(scales)  # the stem trains slowest
    assert by_name["conv1.0.weight"]["lr"] < by_name["layer1.0.conv1.weight"]["lr"] < 0.1


def test_betas_and_eps_reach_the_optimizer_only_when_set() -> None:
    opt = build_optimizer(resnet(), cfg(optimizer="adamw", betas=(0.8, 0.99), eps=1e-6))
    assert all(g["betas"] == (0.8, 0.99) and g["eps"] == 1e-6 for g in opt.param_groups)
    default = build_optimizer(resnet(), cfg(optimizer="adamw"))
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in default.param_groups)
    with pytest.raises(ConfigError, match=r"training\.betas: sgd has no betas"):  # timm would drop them
        build_optimizer(resnet(), cfg(optimizer="sgd", betas=(0.8, 0.99), eps=1e-6))


def test_unknown_optimizer_is_a_config_error_naming_close_matches() -> None:
    with pytest.raises(
        ConfigError, match=r"training\.optimizer: 'adamww' is not a timm optimizer; closest: adamw"
    ):
        check_optimizer("adamww")
    with pytest.raises(ConfigError, match=r"closest: .*lamb"):
        build_optimizer(resnet(), cfg(optimizer="lambb"))
    with pytest.raises(ConfigError, match="'x_adamw' is not"):  # timm itself would quietly use adamw
        check_optimizer("x_adamw")
    check_optimizer("lookahead_adamw")
    opt = build_optimizer(resnet(), cfg(optimizer="lookahead_adamw"))
    assert type(opt).__name__ == "Lookahead"


def _unavailable(name: str) -> str | None:
    try:
        check_optimizer(name)
    except ConfigError as e:
        assert "second-order" in str(e) or isinstance(e.__cause__, ImportError | AssertionError), e
        return str(e)
    return None


@pytest.mark.parametrize("name", timm.optim.list_optimizers())
def test_every_timm_optimizer_builds_on_test_resnet(name: str) -> None:
    """bnb* and fused* are skipped here: bitsandbytes and apex are not installed and need CUDA."""
    why = _unavailable(name)
    if why:
        pytest.skip(why)
    model = resnet()
    opt = build_optimizer(model, cfg(optimizer=name, weightDecay=0.01, layerDecay=0.8))
    if name not in NEEDS_MORE_THAN_A_STEP:
        before = model.fc.weight.detach().clone()
        for seed in range(2):  # adopt's first step only starts its second moment
            train_step(model, opt, seed)
        assert not model.fc.weight.equal(before)


@pytest.fixture
def _keep_signal_handlers() -> Iterator[None]:
    """cli.main installs SIGTERM and SIGINT handlers; pytest's own come back afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.mark.trainer
@pytest.mark.usefixtures("_keep_signal_handlers")
def test_unknown_optimizer_exits_2_before_the_data_is_read(
    job_factory: Callable[..., Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tiny_spec(
        data={"format": "imagefolder", "path": "/nonexistent/data"}, training={"optimizer": "adamww"}
    )
    job = job_factory(spec)
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(job.term_log))
    assert cli.main(["-f", str(job.manifest), "--checkpoint-dir", str(job.ckpt)]) == 2
    term = json.loads(job.term_log.read_text())
    assert term["reason"] == "InvalidConfig"
    assert "training.optimizer: 'adamww' is not a timm optimizer; closest: adamw" in term["message"]


def test_second_order_optimizers_are_refused_before_they_fail_at_the_first_step() -> None:
    with pytest.raises(ConfigError, match=r"training\.optimizer: adahessian is a second-order optimizer"):
        check_optimizer("adahessian")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"optimizer": "sgd", "betas": [0.9, 0.99]}, "training.betas: sgd has no betas"),
        ({"optimizer": "lion", "eps": 1e-8}, "training.eps: lion has no epsilon"),
        ({"optimizer": "adan", "betas": [0.9, 0.99]}, r"training.betas: adan takes 3 betas"),
    ],
)
def test_betas_and_eps_an_optimizer_would_drop_are_refused(fields: dict[str, Any], message: str) -> None:
    """timm pops them without a word when the optimizer has none."""
    with pytest.raises(ConfigError, match=message):
        check_optimizer_args(cfg(**fields))
    check_optimizer_args(cfg(optimizer="adamw", betas=[0.9, 0.99], eps=1e-7))


# -- EMA, channels_last --------------------------------------------------------------------------------
def test_loaded_optimizer_state_gets_the_parameters_channels_last_layout() -> None:
    """A checkpoint stores tensors contiguous; Lamb's norms over its moments sum in memory order, so a
    resumed channels_last run needs them back in the parameter's layout to stay bitwise equal."""
    model = place(resnet(), torch.device("cpu"), True)
    opt = build_optimizer(model, cfg(optimizer="lamb", channelsLast=True))
    train_step(model, opt, 0)
    conv = next(p for p in model.parameters() if p.dim() == 4)
    assert opt.state[conv]["exp_avg"].stride() == conv.stride()
    state = {k: v for k, v in opt.state_dict().items()}
    state["state"] = {i: {k: v.contiguous() for k, v in st.items()} for i, st in state["state"].items()}
    opt.load_state_dict(state)
    assert opt.state[conv]["exp_avg"].stride() != conv.stride()
    before = {id(p): {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    match_state_layout(opt)
    assert opt.state[conv]["exp_avg"].stride() == conv.stride()
    assert all(opt.state[p][k].equal(v) for p in opt.state for k, v in before[id(p)].items())


@pytest.mark.trainer
@pytest.mark.slow
def test_channels_last_lamb_run_resumed_after_sigterm_is_bitwise_equal(
    job_factory: Callable[..., Job],
) -> None:
    spec = tiny_spec(training={"maxSteps": 10, "optimizer": "lamb", "channelsLast": True})
    ref = job_factory(spec, "ref")
    assert ref.run() == 0, ref.log_text()
    job = job_factory(spec, "cl")
    proc = job.start()
    assert job.interrupt_at(proc, 4, signal.SIGTERM) == 143, job.log_text()
    assert job.run() == 0, job.log_text()
    assert job.final_bytes() == ref.final_bytes()


def test_ema_decay_reaches_model_ema() -> None:
    parts = build_components(resnet(), cfg(ema=True, emaDecay=0.99), 10, "fp32", 5)
    assert parts.ema is not None and parts.ema.decay == 0.99


def test_channels_last_puts_the_weights_and_the_inputs_in_channels_last() -> None:
    t = cfg(channelsLast=True, maxSteps=4)
    model = place(resnet(), torch.device("cpu"), True)
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1[0].weight.is_contiguous()
    seen: list[bool] = []
    model.register_forward_pre_hook(
        lambda _, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    runner = StepRunner(model, build_components(model, t, 4, "fp32", 4), t, Runtime(), "fp32", 3)
    runner.run(lambda: batch(), 1)
    assert seen == [True]
    plain = resnet(seed=1)
    plain.load_state_dict(model.state_dict())  # checkpoints do not carry the layout
    assert plain.conv1[0].weight.is_contiguous()
    x = batch(3)[0]
    torch.testing.assert_close(plain.eval()(x), model.eval()(x.contiguous(memory_format=memory_format(True))))


# -- torch.compile -------------------------------------------------------------------------------------
@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile with the aot_eager backend: the same OptimizedModule wrapper and Dynamo/AOTAutograd
    trace as inductor, without inductor's C++ build (about 2 minutes for test_resnet on this 2-core box;
    test_compiled_trainer_run_* below runs the real one on request)."""
    real = torch.compile

    def compile_eagerly(model: nn.Module, mode: str | None = None) -> Any:
        return real(model, mode=mode, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_eagerly)


@pytest.mark.usefixtures("aot_eager")
def test_compiled_model_state_loads_into_an_eager_model_and_back() -> None:
    t = cfg(optimizer="adamw")
    assert compile_model(resnet(), None).__class__ is not OptimizedModule
    source = resnet()
    compiled = compile_model(source, "default")
    assert isinstance(compiled, OptimizedModule) and unwrap(compiled) is source
    # What unwrap() keeps out of checkpoints:
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    opt = build_optimizer(unwrap(compiled), t)
    for seed in range(2):
        train_step(compiled, opt, seed)
    state, opt_state = unwrap(compiled).state_dict(), opt.state_dict()
    assert not any("_orig_mod" in k for k in state)

    eager = resnet(seed=1)
    eager.load_state_dict(state)  # strict: same keys
    eager_opt = build_optimizer(eager, t)
    eager_opt.load_state_dict(opt_state)
    assert eager_opt.state_dict()["state"].keys() == opt_state["state"].keys()
    train_step(eager, eager_opt, 2)

    back = compile_model(resnet(seed=2), "default")
    unwrap(back).load_state_dict(eager.state_dict())
    back_opt = build_optimizer(unwrap(back), t)
    back_opt.load_state_dict(eager_opt.state_dict())
    x = batch(4)[0]
    torch.testing.assert_close(back.eval()(x), eager.eval()(x))
    train_step(back.train(), back_opt, 3)  # the loaded optimizer state continues under compile
    assert {int(s["step"]) for s in back_opt.state_dict()["state"].values()} == {4}


@pytest.mark.usefixtures("aot_eager")
def test_unwrap_sees_through_compile_over_ddp(tmp_path: Path) -> None:
    import torch.distributed as dist

    model = resnet()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = compile_model(nn.parallel.DistributedDataParallel(model), "default")
        assert unwrap(wrapped) is model
    finally:
        dist.destroy_process_group()


def _checkpoint(job: Job) -> dict[str, Any]:
    path = max(job.ckpt.glob("checkpoints/step-*.pt"))
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state


@pytest.mark.trainer
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(
    not os.environ.get("KUBETUNE_TEST_INDUCTOR"),
    reason="inductor's first CPU compile of test_resnet takes about 2 minutes here; set KUBETUNE_TEST_INDUCTOR=1",
)
def test_compiled_trainer_run_checkpoint_and_export_load_without_compile(
    job_factory: Callable[..., Job],
) -> None:
    spec = tiny_spec(
        training={"maxSteps": 3, "ema": True, "channelsLast": True}, checkpoint={"everySteps": 3}
    )
    eager = job_factory(spec, "eager")
    assert eager.run() == 0, eager.log_text()
    spec["training"]["compile"] = "default"
    compiled = job_factory(spec, "compiled")
    assert compiled.run(timeout=800) == 0, compiled.log_text()
    a, b = _checkpoint(eager), _checkpoint(compiled)
    assert a["model"].keys() == b["model"].keys() and a["ema"].keys() == b["ema"].keys()
    assert not any("_orig_mod" in k for k in b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert [g["params"] for g in a["optimizer"]["param_groups"]] == [
        g["params"] for g in b["optimizer"]["param_groups"]
    ]
    t = cfg(maxSteps=3)
    for state in (a, b):  # each run's checkpoint loads into an eager and into a compiled model
        for model in (resnet(num_classes=10), compile_model(resnet(num_classes=10), "default")):
            unwrap(model).load_state_dict(state["model"])
            build_optimizer(unwrap(model), t).load_state_dict(state["optimizer"])
    cfg_json = json.loads((compiled.ckpt / "final/config.json").read_text())
    timm.create_model(
        cfg_json["architecture"],
        pretrained=True,
        num_classes=cfg_json["num_classes"],
        pretrained_cfg_overlay=cfg_json["pretrained_cfg"]
        | {"file": str(compiled.ckpt / "final/model.safetensors")},
    )
