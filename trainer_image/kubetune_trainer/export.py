"""The final model: <checkpoint-dir>/final/model.safetensors + config.json (timm's Hugging Face layout).

config.json's `pretrained_cfg` states the transform the model was trained and evaluated with (input size,
crop, interpolation, mean, std), its classes and the architecture keys timm needs, and no hub location, so
timm's own data-config resolution reproduces the trainer's eval pipeline:

    cfg = json.loads(Path("final/config.json").read_text())
    model = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        num_classes=cfg["num_classes"],
        pretrained_cfg_overlay=cfg["pretrained_cfg"] | {"file": "final/model.safetensors"},
    ).eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    logits = model(transform(PIL.Image.open(path).convert("RGB")).unsqueeze(0))

The overlay is laid over the architecture's registry cfg, so every registry key that would be wrong for
these weights (test-time size and crop, pooling size, label offset, custom loaders) is written explicitly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kubetune_trainer.checkpoint import fsync_dir, write_json_atomic

HUB_KEYS = ("url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "tag")
"""Where timm would fetch the original weights from (and their tag): never exported."""

EVAL_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def export_pretrained_cfg(
    pretrained_cfg: dict[str, Any], eval_cfg: dict[str, Any], classes: list[str], num_classes: int
) -> dict[str, Any]:
    """The trained model's pretrained_cfg, restated for the weights and transform the trainer produced."""
    missing = [k for k in EVAL_KEYS if k not in eval_cfg]
    if missing:
        raise ValueError(f"eval_cfg lacks {missing}; pass kubetune_trainer.data.eval_data_config(...)")
    cfg = {k: v for k, v in pretrained_cfg.items() if k not in HUB_KEYS}
    input_size = list(eval_cfg["input_size"])
    size_changed = list(pretrained_cfg.get("input_size") or ()) != input_size
    cfg.update({k: eval_cfg[k] for k in EVAL_KEYS})
    cfg.update(
        # resolve_data_config(use_test_size=True) reads these: same size and crop, so no other transform
        test_input_size=input_size,
        test_crop_pct=eval_cfg["crop_pct"],
        num_classes=num_classes,
        label_names=list(classes),
        # with num_classes equal to the file's, timm would cut label_offset rows off our classifier
        label_offset=None,
        label_descriptions=None,
        custom_load=False,  # a registry npz loader cannot read our safetensors
        test_pool_size=None,
    )
    if size_changed:
        cfg["pool_size"] = None  # the registry's is for its input size; timm keeps it null when unknown
    for key in ("first_conv", "classifier"):
        cfg.setdefault(key, None)
    return cfg


def export_final(
    out_dir: Path,
    state: dict[str, torch.Tensor],
    model_name: str,
    pretrained_cfg: dict[str, Any],
    eval_cfg: dict[str, Any],
    classes: list[str],
    num_classes: int,
) -> Path:
    """Write weights then config atomically; returns the safetensors path.

    `pretrained_cfg` is the trained model's `model.pretrained_cfg`; `eval_cfg` the create_transform keyword
    arguments training and evaluation used (kubetune_trainer.data.eval_data_config).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    weights = out_dir / "model.safetensors"
    tmp = out_dir / ".model.safetensors.tmp"
    save_file(
        tensors, str(tmp), metadata={"format": "pt"}
    )  # one key: safetensors orders metadata by hash, more would make bytes vary
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, weights)
    fsync_dir(out_dir)
    cfg = export_pretrained_cfg(pretrained_cfg, eval_cfg, classes, num_classes)
    cfg["architecture"] = cfg.get("architecture") or model_name.split(".")[0]
    doc = {
        "architecture": cfg["architecture"],
        "num_classes": num_classes,
        "label_names": list(classes),
        "pretrained_cfg": cfg,
    }
    # tuples become lists; anything else JSON cannot hold becomes its str()
    write_json_atomic(out_dir / "config.json", json.loads(json.dumps(doc, default=str)))
    return weights
