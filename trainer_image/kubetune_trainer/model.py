"""The timm model: creation by name, local or cached weights, classifier size, freezing, placement
(channels_last), torch.compile, and unwrap() down to the module checkpoints hold."""

from __future__ import annotations

import contextlib
import difflib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from kubetune_trainer.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

# How many tensor names an error or warning lists before "... and N more".
_LIST_MAX = 10


@dataclass
class BuiltModel:
    model: nn.Module
    frozen_prefixes: tuple[str, ...]
    """Names of the outermost fully frozen modules (what set_train_mode takes)."""
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


def _cfg_classifier_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    heads = cfg.get("classifier") or ()
    return (heads,) if isinstance(heads, str) else tuple(heads)


def _timm_heads(model: nn.Module) -> tuple[Any, ...]:
    get = getattr(model, "get_classifier", None)
    got = get() if callable(get) else None
    return tuple(got) if isinstance(got, tuple | list) else (got,)


def classifier_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The classifier head(s) by module name: those pretrained_cfg["classifier"] names and get_classifier().

    The cfg names the modules whose tensors timm replaces for another class count (several for distilled
    models: head and head_dist; volo's aux_head, which get_classifier() omits); get_classifier() returns
    the whole head where it is more than that last layer (levit's BatchNorm + Linear, caformer's MLP).
    Either may be a parameterless Identity (num_classes=0).
    """
    modules = dict(model.named_modules())
    found = {n: modules[n] for n in _cfg_classifier_names(model) if n in modules}
    names = {id(m): n for n, m in modules.items()}
    found.update({names[id(h)]: h for h in _timm_heads(model) if isinstance(h, nn.Module) and id(h) in names})
    return found


def classifier_param_names(model: nn.Module) -> set[str]:
    """Names (in model.named_parameters()) of the classifier's parameters, matched by identity."""
    ids = {id(p) for m in classifier_modules(model).values() for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _describe_classifier(model: nn.Module) -> str:
    cfg_names = _cfg_classifier_names(model)
    kinds = ", ".join(type(h).__name__ for h in _timm_heads(model))
    return f"pretrained_cfg classifier {list(cfg_names)}, get_classifier() -> {kinds}"


def freeze(model: nn.Module, spec: str | tuple[str, ...]) -> tuple[str, ...]:
    """Set requires_grad False per model.freeze; return the outermost fully frozen modules' names.

    `backbone` freezes every parameter except the classifier's (classifier_param_names); a tuple freezes
    the parameters whose names start with any of its prefixes.
    """
    if spec == "none":
        return ()
    named = dict(model.named_parameters())
    if spec == "backbone":
        keep = classifier_param_names(model)
        if not keep:
            raise ConfigError(
                "model.freeze: backbone trains only the classifier, and this model's classifier has no "
                f"parameters ({_describe_classifier(model)}); was it built with num_classes=0? "
                "List parameter-name prefixes to freeze instead"
            )
        frozen = [n for n in named if n not in keep]
    else:
        prefixes = tuple(spec)
        for p in prefixes:
            if not any(n.startswith(p) for n in named):
                top = sorted({n.split(".")[0] for n in named})
                raise ConfigError(
                    f"model.freeze: prefix {p!r} matches no parameter; top-level modules: {top}"
                )
        frozen = [n for n in named if n.startswith(prefixes)]
    for n in frozen:
        named[n].requires_grad_(False)
    return frozen_modules(model)


def frozen_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the outermost submodules that have parameters and none of them trainable."""
    out: list[str] = []
    for name, module in model.named_modules():
        # named_modules is pre-order: a frozen module's descendants follow it directly.
        if not name or (out and name.startswith(out[-1] + ".")):
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            out.append(name)
    return tuple(out)


def set_train_mode(model: nn.Module, frozen: tuple[str, ...]) -> None:
    """train(), except BatchNorm inside the frozen modules keeps its running stats (eval).

    `frozen` holds module names (freeze's result); a name matches itself and its descendants only, so a
    frozen `head.norm` leaves `head.fc` alone and `layers.1` leaves `layers.10` alone. Names are those of
    the unwrapped model: under DDP they would all start with `module.`.
    """
    model.train()
    if not frozen:
        return
    exact = set(frozen)
    below = tuple(f + "." for f in frozen)
    for name, module in unwrap(model).named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (name in exact or name.startswith(below)):
            module.eval()


class _NoKeys(NamedTuple):
    """What timm reads of load_state_dict's result while _deferred_loads holds the load back."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@contextlib.contextmanager
def _deferred_loads() -> Iterator[list[tuple[nn.Module, dict[str, torch.Tensor]]]]:
    """Record the state dicts timm's load_pretrained hands to load_state_dict instead of loading them.

    timm prepares the file its own way (the model's checkpoint filter, input-conv adaptation, classifier
    removal) and then loads with strict=False, which would leave mismatched tensors random without a word;
    recording the prepared dict lets load_checked() decide. timm builds models on the calling thread and
    calls load_state_dict once, on the finished model.
    """
    calls: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    original = nn.Module.load_state_dict

    def record(self: nn.Module, state_dict: Any, strict: bool = True, assign: bool = False) -> _NoKeys:
        calls.append((self, dict(state_dict)))
        return _NoKeys([], [])

    nn.Module.load_state_dict = record  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        nn.Module.load_state_dict = original  # type: ignore[method-assign]


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _LIST_MAX} more" if len(names) > _LIST_MAX else ""
    return ", ".join(names[:_LIST_MAX]) + more


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], path: str, strict: bool) -> None:
    """Load the state dict timm prepared from `path`; tensors that do not fit are an error if `strict`.

    The classifier's tensors may be absent, unused or of another shape (another class count): those stay
    initialised. Any other model tensor the file does not provide, or file tensor the model does not use,
    is a ConfigError when `strict`, else a warning, and the model's tensor trains from its initialisation.
    """
    own = model.state_dict()
    heads = tuple(n + "." for n in classifier_modules(model))
    wrong = {k: v for k, v in state.items() if k in own and own[k].shape != v.shape}
    usable = {k: v for k, v in state.items() if k not in wrong}
    result = nn.Module.load_state_dict(model, usable, strict=False)
    replaced = sorted(
        {k for k in [*wrong, *result.missing_keys, *result.unexpected_keys] if k.startswith(heads)}
    )
    problems = []
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    if missing:
        problems.append(f"not in the file: {_listing(missing)}")
    shapes = [
        f"{k} (file {list(wrong[k].shape)}, model {list(own[k].shape)})"
        for k in wrong
        if not k.startswith(heads)
    ]
    if shapes:
        problems.append(f"wrong shape: {_listing(shapes)}")
    unused = [k for k in result.unexpected_keys if not k.startswith(heads)]
    if unused:
        problems.append(f"not used by the model: {_listing(unused)}")
    if problems:
        what = "; ".join(problems)
        if strict:
            raise ConfigError(
                f"model.weights: {path} does not fit {type(model).__name__}: {what}. Use weights saved "
                "from this model.name (and variant), or set model.strictWeights: false to train them from "
                "scratch"
            )
        log.warning(
            "model.weights: %s does not fit %s; model.strictWeights is false, so the model's tensors "
            "listed train from their initialisation and the file's are ignored: %s",
            path,
            type(model).__name__,
            what,
        )
    log.info(
        "model.weights: loaded %d tensors from %s; classifier initialised anew: %s",
        len(usable) - len(result.unexpected_keys),
        path,
        replaced or "none",
    )


def create_from_file(name: str, path: str, strict: bool, kwargs: dict[str, Any]) -> nn.Module:
    """timm.create_model with `path` as the pretrained file, so the model's own checkpoint filter runs.

    The overlay's num_classes is the model's own, so timm keeps the file's classifier when its shape fits
    and load_checked() replaces it when it does not (timm would compare with the hub weights' count).
    """
    import timm

    if not Path(path).is_file():
        raise ConfigError(f"model.weights: {path} is not a file")
    overlay: dict[str, Any] = {"file": path, "num_classes": kwargs["num_classes"]}
    if not path.endswith(".npz"):
        # custom_load means "the hub file is a .npz for model.load_pretrained()": not this file.
        overlay["custom_load"] = False
    with _deferred_loads() as calls:
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except Exception as e:  # unreadable file, or a checkpoint filter that cannot read it
            raise ConfigError(
                f"model.weights: cannot load {path} into {name}: {type(e).__name__}: {e}"
            ) from e
    states = [state for target, state in calls if target is model]
    if states:
        load_checked(model, states[-1], path, strict)
    else:
        log.warning("model.weights: %s was loaded by %s's own loader and not checked", path, name)
    return model


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> BuiltModel:
    """Create the timm model with `num_classes` outputs, load weights, freeze, and count parameters."""
    import timm

    check_name(cfg.name)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    pcfg = timm.models.get_pretrained_cfg(cfg.name)
    if pcfg is not None and pcfg.fixed_input_size:
        kwargs["img_size"] = image_size
    if cfg.weights:
        model = create_from_file(cfg.name, cfg.weights, cfg.strictWeights, kwargs)
    else:
        try:
            model = timm.create_model(cfg.name, pretrained=cfg.pretrained, **kwargs)
        except (RuntimeError, OSError) as e:
            # Typically: pretrained weights not in the local hub cache and no network to fetch them.
            raise ConfigError(
                f"model.pretrained: cannot load pretrained weights for {cfg.name}: {e}; "
                "set model.weights to a local file or populate HF_HOME"
            ) from e
    frozen = freeze(model, cfg.freeze)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        spec = cfg.freeze if isinstance(cfg.freeze, str) else f"the prefixes {list(cfg.freeze)}"
        raise ConfigError(
            f"model.freeze: {spec} leaves nothing to train: every parameter of {cfg.name} is frozen, "
            f"the classifier too ({_describe_classifier(model)})"
        )
    log.info(
        "model %s: %d trainable of %d parameters (frozen modules: %s)",
        cfg.name,
        trainable,
        total,
        list(frozen) or "none",
    )
    return BuiltModel(model, frozen, trainable, total)


def memory_format(channels_last: bool) -> torch.memory_format:
    """training.channelsLast as the memory format of the model's 4-d weights and of its input batches."""
    return torch.channels_last if channels_last else torch.contiguous_format


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """The model on `device`, its 4-d weights in channels_last when asked (inputs must follow: see
    memory_format). Checkpoints stay layout-free: state dicts load into either layout by copy."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def compile_model(model: nn.Module, mode: str | None) -> nn.Module:
    """torch.compile(model, mode=mode), or `model` when mode is None. The wrapper shares the parameters
    and unwrap() sees through it, so state dicts and optimizer state keep their eager keys."""
    if mode is None:
        return model
    compiled: nn.Module = torch.compile(model, mode=mode)  # type: ignore[assignment]
    return compiled


def unwrap(model: nn.Module) -> nn.Module:
    """The trained module below torch.compile's OptimizedModule and DDP, in any nesting: the one whose
    state_dict is checkpointed and exported (no `_orig_mod.` or `module.` prefixes)."""
    from torch._dynamo import OptimizedModule  # imported by torch/timm already: no cost

    while True:
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state tensors their parameter's memory layout (channels_last conv weights).

    A checkpoint stores tensors contiguous; an uninterrupted run keeps its moments in the parameter's
    layout (zeros_like), and a reduction over them (Lamb's and LARS' norms) sums in memory order, so the
    layout must match for a resumed run to stay bitwise equal."""
    for param, state in optimizer.state.items():
        if not isinstance(param, torch.Tensor):
            continue
        for key, value in state.items():
            if (
                isinstance(value, torch.Tensor)
                and value.shape == param.shape
                and value.stride() != param.stride()
            ):
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
