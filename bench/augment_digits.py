"""Does data.augment make a model robust to distortions it never saw clean? Measured as a user would.

test_resnet at 32 px is trained by `kubetune-train -f manifest.yaml` on 400 clean scikit-learn digits (an
image folder of 8x8 digits upscaled to 32 px PNGs), EPOCHS epochs, once without augmentation and once with
the recommended preset (bench.timm_baseline.RECOMMENDED_AUGMENT: hflip 0, a flipped digit is another
digit). Each exported final/ model is loaded the timm way (create_model + its pretrained_cfg's data config,
as kubetune_trainer.predict does) and scored on 600 other digits under a fixed random affine distortion
(torchvision RandomAffine degrees 20, translate 0.15, scale 0.75-1.1, seed 0). The issue measured top-1
0.55 (off) vs 0.64 (on) with a bare timm loop. Keys: `top1_off`, `top1_on`, `gain`, and
`images_reported_bad_*` (a transform that raises is caught as an undecodable image and replaced by a
stand-in). BENCH_AUGMENT_DIGITS_RUNS=off runs one of the two.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRAIN, TEST, EPOCHS, IMAGE, SEED = 400, 600, 25, 32, 0
AFFINE = {"degrees": 20, "translate": (0.15, 0.15), "scale": (0.75, 1.1)}
REPO = Path(__file__).resolve().parents[1]


def write_digits(root: Path) -> tuple[Path, list[tuple[Any, str]]]:
    """(train folder of TRAIN clean PNGs, TEST distorted (PIL image, label) pairs), disjoint, seeded."""
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from torchvision.transforms import RandomAffine

    ds = load_digits()
    order = np.random.default_rng(SEED).permutation(len(ds.target))

    def upscaled(i: int) -> Any:
        small = Image.fromarray((ds.images[i] * (255 / 16)).astype(np.uint8), mode="L")
        return small.resize((IMAGE, IMAGE), Image.Resampling.BILINEAR)

    for i in order[:TRAIN]:
        folder = root / "train" / str(ds.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        upscaled(int(i)).save(folder / f"{i:04d}.png")
    distort = RandomAffine(**AFFINE)
    torch.manual_seed(SEED)  # RandomAffine draws its parameters from torch's global RNG
    test = [(distort(upscaled(int(i))), str(ds.target[i])) for i in order[TRAIN : TRAIN + TEST]]
    return root / "train", test


def train(root: Path, name: str, data: Path, augment: dict[str, Any] | None) -> tuple[Path, str]:
    """Run kubetune-train on a manifest; (the final/ export, the trainer's log)."""
    import yaml

    spec: dict[str, Any] = {
        "model": {"name": "test_resnet"},
        "data": {"path": str(data), "imageSize": IMAGE, "valFraction": 0.0, "numWorkers": 1},
        "training": {"epochs": EPOCHS, "batchSize": 32, "learningRate": 0.01, "warmupSteps": 10},
        "checkpoint": {"everySteps": 0},
        "metrics": {"port": 0},
        "tensorboard": {"enabled": False},
    }
    if augment is not None:
        spec["data"]["augment"] = augment
    manifest = root / f"{name}.yaml"
    manifest.write_text(
        yaml.safe_dump({"kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}, sort_keys=False)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer_image"), "WANDB_MODE": "disabled"}
    env.setdefault("OMP_NUM_THREADS", "1")
    ckpt = root / name
    argv = [sys.executable, "-m", "kubetune_trainer", "-f", str(manifest), "--checkpoint-dir", str(ckpt)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"kubetune-train {name} exited {done.returncode}: {done.stderr[-2000:]}")
    return ckpt / "final", done.stderr


def top1(final: Path, test: list[tuple[Any, str]]) -> float:
    """Top-1 of the export on the distorted digits, loaded and transformed the timm way."""
    import torch

    from kubetune_trainer.predict import load_export

    loaded = load_export(final, "cpu")  # timm.create_model(..., pretrained_cfg_overlay) + its data config
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(test), 100):
            chunk = test[i : i + 100]
            x = torch.stack([loaded.transform(img.convert("RGB")) for img, _ in chunk])
            pred = loaded.model(x).argmax(dim=1).tolist()
            correct += sum(loaded.labels[p] == label for p, (_, label) in zip(pred, chunk, strict=True))
    return correct / len(test)


def run() -> dict[str, Any]:
    from bench.timm_baseline import RECOMMENDED_AUGMENT

    runs = os.environ.get("BENCH_AUGMENT_DIGITS_RUNS", "off,on").split(",")
    out: dict[str, Any] = {
        "model": "test_resnet",
        "image_size": IMAGE,
        "train_images": TRAIN,
        "test_images": TEST,
        "epochs": EPOCHS,
        "test_distortion": f"RandomAffine({AFFINE}), seed {SEED}",
        "augment_preset": ", ".join(f"{k}={v}" for k, v in RECOMMENDED_AUGMENT.items()),
        "issue_bare_timm_top1": "0.55 off, 0.64 on",
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, test = write_digits(root / "digits")
        for run_name in runs:
            t0 = time.perf_counter()
            final, log = train(
                root, f"digits-{run_name}", data, RECOMMENDED_AUGMENT if run_name == "on" else None
            )
            out[f"top1_{run_name}"] = top1(final, test)
            out[f"train_seconds_{run_name}"] = time.perf_counter() - t0
            # a transform error is caught as an undecodable image: count what the trainer reported
            out[f"images_reported_bad_{run_name}"] = len(re.findall(r"cannot decode train image", log))
    if "top1_on" in out and "top1_off" in out:
        out["gain"] = out["top1_on"] - out["top1_off"]
    return out


if __name__ == "__main__":
    print(run())
