"""The final model: <checkpoint-dir>/final/model.safetensors + config.json (timm's Hugging Face layout).

Load it with timm.create_model(name, pretrained=True, num_classes=K,
pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=K)); without num_classes in the
overlay timm drops the classifier because K differs from the original pretrained cfg's class count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kubetune_trainer.checkpoint import fsync_dir, write_json_atomic


def export_final(
    out_dir: Path,
    state: dict[str, torch.Tensor],
    model_name: str,
    pretrained_cfg: dict[str, Any],
    classes: list[str],
) -> Path:
    """Write weights then config atomically; returns the safetensors path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    num_classes = len(classes) if "num_classes" not in pretrained_cfg else int(pretrained_cfg["num_classes"])
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
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in pretrained_cfg.items()}
    doc = {
        "architecture": model_name.split(".")[0],
        "num_classes": num_classes,
        "label_names": classes,
        "pretrained_cfg": cfg,
    }
    write_json_atomic(out_dir / "config.json", json.loads(json.dumps(doc, default=str)))
    return weights
