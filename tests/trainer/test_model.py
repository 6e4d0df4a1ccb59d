"""model.py: freezing from timm's own classifier knowledge, local weights through timm's pretrained path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from kubetune_trainer.config import ConfigError, ModelConfig
from kubetune_trainer.model import build_model, freeze, set_train_mode

# The smallest variant of each family (fewest parameters among timm.list_models(pattern)), and for the
# families whose classifier is more than one Linear called `head`/`fc`, the parameters that must train.
FAMILIES: dict[str, set[str] | None] = {
    "resnet10t": {"fc.weight", "fc.bias"},
    "convnext_zepto_rms": {"head.fc.weight", "head.fc.bias"},  # head.norm beside it stays frozen
    "convnextv2_atto": {"head.fc.weight", "head.fc.bias"},
    "maxvit_pico_rw_256": {"head.fc.weight", "head.fc.bias"},
    "davit_tiny": {"head.fc.weight", "head.fc.bias"},
    "hiera_tiny_224": {"head.fc.weight", "head.fc.bias"},
    "edgenext_xx_small": {"head.fc.weight", "head.fc.bias"},
    # pretrained_cfg names head.fc.fc2; get_classifier() is the whole MLP head.
    "caformer_s18": {f"head.fc.{m}.{p}" for m in ("fc1", "norm", "fc2") for p in ("weight", "bias")},
    "efficientvit_m0": {"head.linear.weight", "head.linear.bias"},
    "efficientvit_b0": {"head.classifier.4.weight", "head.classifier.4.bias"},
    # Distilled: two heads, each BatchNorm + Linear (pretrained_cfg names only the Linear layers).
    "levit_128s": {
        f"{h}.{m}.{p}" for h in ("head", "head_dist") for m in ("bn", "linear") for p in ("weight", "bias")
    },
    "vit_tiny_patch16_224": {"head.weight", "head.bias"},
    "deit_tiny_distilled_patch16_224": {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"},
    "efficientnet_lite0": {"classifier.weight", "classifier.bias"},
    "mobilenetv3_small_050": {"classifier.weight", "classifier.bias"},
    "regnetx_002": {"head.fc.weight", "head.fc.bias"},
    "swin_tiny_patch4_window7_224": {"head.fc.weight", "head.fc.bias"},
    "beit_base_patch16_224": {"head.weight", "head.bias"},
    "eva02_tiny_patch14_224": {"head.weight", "head.bias"},
    "coat_tiny": {"head.weight", "head.bias"},
    # aux_head adds to the logits; get_classifier() returns only head, pretrained_cfg names both.
    "volo_d1_224": {"head.weight", "head.bias", "aux_head.weight", "aux_head.bias"},
    "repvit_m1": {
        f"head.{h}.{m}.{p}" for h in ("head", "head_dist") for m in ("bn", "l") for p in ("weight", "bias")
    },
    "mobilevit_xxs": {"head.fc.weight", "head.fc.bias"},
    "fastvit_t8": {"head.fc.weight", "head.fc.bias"},
    "tiny_vit_5m_224": {"head.fc.weight", "head.fc.bias"},
    "xcit_nano_12_p8_224": {"head.weight", "head.bias"},
    "mambaout_femto": {"head.fc.weight", "head.fc.bias"},
    "inception_v3": {"fc.weight", "fc.bias"},
}


def meta_model(name: str, num_classes: int = 7) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def expected_classifier(model: nn.Module) -> set[str]:
    """What timm calls the classifier: the modules pretrained_cfg names and those get_classifier() returns."""
    names = model.pretrained_cfg["classifier"]
    prefixes = tuple(n + "." for n in ((names,) if isinstance(names, str) else names))
    by_name = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    heads = model.get_classifier()
    ids = {id(p) for h in (heads if isinstance(heads, tuple) else (heads,)) for p in h.parameters()}
    return by_name | {n for n, p in model.named_parameters() if id(p) in ids}


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.unit
@pytest.mark.parametrize("name", FAMILIES)
def test_backbone_freeze_trains_exactly_the_classifier(name: str) -> None:
    model = meta_model(name)
    frozen = freeze(model, "backbone")
    want = expected_classifier(model)
    assert want and trainable(model) == want
    if FAMILIES[name] is not None:
        assert want == FAMILIES[name]
    # set_train_mode matches a frozen name and its descendants: none of them may own a trainable parameter.
    below = tuple(f + "." for f in frozen)
    assert not {n for n in want if n.startswith(below)}
    assert len(frozen) > 0 and "" not in frozen


@pytest.mark.unit
def test_backbone_freeze_without_a_classifier_says_why() -> None:
    model = meta_model("resnet10t", num_classes=0)
    with pytest.raises(
        ConfigError, match=r"model\.freeze: backbone.*classifier \['fc'\].*Identity.*num_classes=0"
    ):
        freeze(model, "backbone")


@pytest.mark.unit
def test_prefix_freeze_is_by_parameter_name_prefix() -> None:
    model = meta_model("resnet10t")
    frozen = freeze(model, ("conv1", "layer1"))
    assert trainable(model) == {
        n for n, _ in model.named_parameters() if not n.startswith(("conv1", "layer1"))
    }
    assert frozen == ("conv1", "layer1")
    with pytest.raises(ConfigError, match=r"prefix 'nope' matches no parameter; top-level modules: \['bn1'"):
        freeze(meta_model("resnet10t"), ("nope",))


@pytest.mark.unit
def test_set_train_mode_keeps_frozen_batchnorm_in_eval_and_nothing_else() -> None:
    model = nn.Module()
    model.layers = nn.ModuleList(nn.BatchNorm1d(2) for _ in range(11))
    model.head = nn.Module()
    model.head.norm = nn.BatchNorm1d(2)
    model.head.fc = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 3))
    model.eval()
    set_train_mode(model, ("layers.1", "head.norm"))
    evals = {n for n, m in model.named_modules() if not m.training}
    assert evals == {"layers.1", "head.norm"}  # not layers.10, not head.fc.0


@pytest.mark.trainer
def test_set_train_mode_under_ddp_matches_the_unwrapped_names(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    frozen = freeze(model, ("0", "1"))
    assert frozen == ("0", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        set_train_mode(ddp, frozen)
        assert ddp.training and not model[1].training and model[3].training
    finally:
        dist.destroy_process_group()


@pytest.mark.unit
def test_backbone_freeze_leaves_a_batchnorm_in_the_classifier_training() -> None:
    model = meta_model("levit_128s")
    set_train_mode(model, freeze(model, "backbone"))
    bns = {n: m.training for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert bns["head.bn"] and bns["head_dist.bn"]
    assert not any(t for n, t in bns.items() if not n.startswith(("head.", "head_dist.")))


# Real models on CPU from here on: timm's test_* models, "local weights" saved from pretrained=False ones.


def saved(tmp_path: Path, model: nn.Module, fmt: str = "safetensors") -> tuple[Path, dict[str, torch.Tensor]]:
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path, state


def differing(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    own = model.state_dict()
    return {
        k
        for k, v in own.items()
        if k not in state or v.shape != state[k].shape or not torch.equal(v, state[k])
    }


@pytest.mark.trainer
def test_vit_weights_at_another_image_size_resample_pos_embed(tmp_path: Path) -> None:
    src = timm.create_model("test_vit", pretrained=False)  # 160 px: a 10x10 grid
    path, state = saved(tmp_path, src)
    built = build_model(ModelConfig(name="test_vit", weights=str(path)), 1000, 224)
    model = built.model
    assert model.patch_embed.grid_size == (14, 14)
    want = resample_abs_pos_embed(state["pos_embed"], new_size=[14, 14], num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 197, 64)
    torch.testing.assert_close(model.pos_embed.detach(), want)
    assert differing(model, state) == {"pos_embed"}  # the classifier fits (1000 classes) and is kept


@pytest.mark.trainer
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weights_for_another_class_count_replace_only_the_classifier(tmp_path: Path, fmt: str) -> None:
    path, state = saved(tmp_path, timm.create_model("test_resnet", pretrained=False, num_classes=5), fmt)
    model = build_model(ModelConfig(name="test_resnet", weights=str(path)), 7, 160).model
    assert differing(model, state) == {"fc.weight", "fc.bias"}
    assert model.fc.weight.shape == (7, model.fc.in_features)


@pytest.mark.trainer
def test_weights_for_the_same_class_count_keep_the_classifier(tmp_path: Path) -> None:
    path, state = saved(tmp_path, timm.create_model("test_resnet", pretrained=False, num_classes=7))
    model = build_model(ModelConfig(name="test_resnet", weights=str(path)), 7, 160).model
    assert differing(model, state) == set()


@pytest.mark.trainer
@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("drop", r"not in the file: layer1\.0\.conv1\.weight"),
        ("reshape", r"wrong shape: layer1\.0\.conv1\.weight \(file \[3, 3\], model \[\d+, \d+, 3, 3\]\)"),
        ("extra", r"not used by the model: extra\.weight"),
    ],
)
def test_weights_that_do_not_fit_are_an_error_or_with_strict_off_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str, says: str
) -> None:
    state = {k: v.clone() for k, v in timm.create_model("test_resnet", num_classes=5).state_dict().items()}
    key = "layer1.0.conv1.weight"
    if damage == "drop":
        del state[key]
    elif damage == "reshape":
        state[key] = torch.zeros(3, 3)
    else:
        state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConfigError, match=rf"model\.weights: {path}.*{says}.*model\.strictWeights: false"):
        build_model(ModelConfig(name="test_resnet", weights=str(path)), 7, 160)

    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.model"):
        built = build_model(ModelConfig(name="test_resnet", weights=str(path), strictWeights=False), 7, 160)
    named = "extra.weight" if damage == "extra" else key
    assert any(r.levelno == logging.WARNING and named in r.getMessage() for r in caplog.records)
    model = built.model
    assert differing(model, state) - {"fc.weight", "fc.bias"} == (set() if damage == "extra" else {key})
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.trainer
def test_backbone_freeze_with_weights_trains_only_the_classifier(tmp_path: Path) -> None:
    path, state = saved(tmp_path, timm.create_model("test_convnext", pretrained=False, num_classes=5))
    built = build_model(ModelConfig(name="test_convnext", weights=str(path), freeze="backbone"), 7, 160)
    model = built.model
    assert trainable(model) == {"head.fc.weight", "head.fc.bias"}
    assert differing(model, state) == {"head.fc.weight", "head.fc.bias"}
    assert built.trainable_params == sum(p.numel() for p in model.head.fc.parameters())
    assert "head.norm" in built.frozen_prefixes and "head" not in built.frozen_prefixes


@pytest.mark.trainer
def test_unreadable_or_absent_weights_name_the_field_and_path(tmp_path: Path) -> None:
    absent = tmp_path / "absent.safetensors"
    with pytest.raises(ConfigError, match=rf"model\.weights: {absent} is not a file"):
        build_model(ModelConfig(name="test_resnet", weights=str(absent)), 7, 160)
    with pytest.raises(ConfigError, match=rf"model\.weights: {tmp_path} is not a file"):
        build_model(ModelConfig(name="test_resnet", weights=str(tmp_path)), 7, 160)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=rf"model\.weights: cannot load {junk} into test_resnet"):
        build_model(ModelConfig(name="test_resnet", weights=str(junk)), 7, 160)


@pytest.mark.trainer
def test_prefixes_that_freeze_everything_say_so() -> None:
    with pytest.raises(
        ConfigError, match=r"model\.freeze: the prefixes \[''\] leaves nothing to train.*\['fc'\]"
    ):
        build_model(ModelConfig(name="test_resnet", freeze=("",)), 7, 160)
