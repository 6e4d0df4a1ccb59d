"""The timm model: creation by name, local or cached weights, classifier size, freezing."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune_trainer.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    model: nn.Module
    frozen_prefixes: tuple[str, ...]
    trainable_params: int
    total_params: int


def data_config(name: str) -> dict[str, Any]:
    """The model's pretrained data config (input size, mean/std, interpolation, crop) without building it."""
    import timm
    from timm.data import resolve_data_config

    check_name(name)
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown pretrained tag, e.g. resnet18.bogus
        raise ConfigError(f"model.name: {e}") from e
    d = cfg.to_dict() if cfg is not None else {}
    return dict(resolve_data_config(pretrained_cfg=d))


def check_name(name: str) -> None:
    """ConfigError with the closest timm names when `name` is not a timm model."""
    import timm

    arch = name.split(".")[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ConfigError(f"model.name: {name!r} is not a timm model{hint}")


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the classifier head, from the model's pretrained cfg."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    heads = cfg.get("classifier") or "fc"
    return (heads,) if isinstance(heads, str) else tuple(heads)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a local .safetensors/.pth; tensors whose shape differs (a head for other classes) are skipped."""
    from timm.models import load_state_dict

    if not Path(path).is_file():
        raise ConfigError(f"model.weights: {path} is not a file")
    try:
        state = load_state_dict(path)
    except Exception as e:
        raise ConfigError(f"model.weights: cannot read {path}: {e}") from e
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"model.weights: no tensor in {path} matches the model's parameters")
    skipped = sorted(set(state) - set(usable))
    missing = sorted(set(own) - set(usable))
    model.load_state_dict(usable, strict=False)
    log.info(
        "loaded %d tensors from %s; skipped %s; left initialised %s", len(usable), path, skipped, missing
    )


def freeze(model: nn.Module, spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """Set requires_grad False for the frozen prefixes; return them (empty for `none`)."""
    if spec == "none":
        return ()
    names = [n for n, _ in model.named_parameters()]
    if spec == "backbone":
        heads = classifier_prefixes(model)
        prefixes = tuple(sorted({n.split(".")[0] for n in names if not n.startswith(heads)}))
    else:
        prefixes = tuple(spec)
        for p in prefixes:
            if not any(n.startswith(p) for n in names):
                top = sorted({n.split(".")[0] for n in names})
                raise ConfigError(
                    f"model.freeze: prefix {p!r} matches no parameter; top-level modules: {top}"
                )
    for n, param in model.named_parameters():
        if n.startswith(prefixes):
            param.requires_grad_(False)
    return prefixes


def set_train_mode(model: nn.Module, frozen_prefixes: tuple[str, ...]) -> None:
    """train(), except normalisation layers inside frozen modules keep their running stats (eval)."""
    model.train()
    if not frozen_prefixes:
        return
    for name, module in model.named_modules():
        if name and name.startswith(frozen_prefixes) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> BuiltModel:
    """Create the timm model with `num_classes` outputs, load weights, freeze, and count parameters."""
    import timm

    check_name(cfg.name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    pcfg = timm.models.get_pretrained_cfg(cfg.name)
    if pcfg is not None and pcfg.fixed_input_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(cfg.name, pretrained=cfg.pretrained and not cfg.weights, **kwargs)
    except (RuntimeError, OSError) as e:
        # Typically: pretrained weights not in the local hub cache and no network to fetch them.
        raise ConfigError(
            f"model.pretrained: cannot load pretrained weights for {cfg.name}: {e}; "
            "set model.weights to a local file or populate HF_HOME"
        ) from e
    if cfg.weights:
        load_weights(model, cfg.weights)
    frozen = freeze(model, cfg.freeze)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ConfigError("model.freeze: every parameter is frozen; nothing to train")
    log.info(
        "model %s: %d trainable of %d parameters (frozen: %s)",
        cfg.name,
        trainable,
        total,
        list(frozen) or "none",
    )
    return BuiltModel(model, frozen, trainable, total)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}
