"""`kubetune-predict MODEL_DIR INPUT...`: classify images with an exported model, loaded as a timm user would.

MODEL_DIR is an export (`<checkpoint-dir>/final/`): config.json + model.safetensors. The model is built with
`timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=pretrained_cfg | {"file": ...})`
and images go through `create_transform(**resolve_model_data_config(model))`, so what this prints is what
anyone loading the export with timm gets. INPUTs are image files or folders (searched recursively). A
folder whose subfolders are all class names of the model is scored: top-1, top-5 and per-class accuracy
go to stderr and `true_label` into the output. Exit 2 for a bad model dir, input or class folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("kubetune_trainer.predict")


class PredictError(Exception):
    """A bad model dir, input or class folder: the message names the path and the fix (exit 2)."""


@dataclass(frozen=True)
class Item:
    path: Path
    true_label: str | None = None


@dataclass
class Prediction:
    path: Path
    true_label: str | None
    top: list[tuple[str, float]]
    """(label, probability), most probable first; as many as --top-k (at most the number of classes)."""
    top5: list[str] = field(default_factory=list)
    """The five most probable labels, for the top-5 accuracy whatever --top-k is."""


@dataclass
class Loaded:
    model: Any
    transform: Any
    labels: list[str]
    data_cfg: dict[str, Any]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kubetune-predict",
        description="Classify images with a model exported by kubetune-train (<checkpoint-dir>/final/).",
    )
    p.add_argument("model_dir", type=Path, help="an exported model folder: config.json + model.safetensors")
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5, help="labels per image in the output (default 5)")
    p.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default csv)")
    p.add_argument("-o", "--output", type=Path, default=None, help="output file (default stdout)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes (default 0: in-process)")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    p.add_argument(
        "--labelled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score folders of class folders (default: when every subfolder is one of the model's labels)",
    )
    args = p.parse_args(argv)
    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    return args


def load_export(model_dir: Path, device: str) -> Loaded:
    """The export as timm loads it (see kubetune_trainer.export); PredictError when it is not one."""
    import timm
    from timm.data import create_transform, resolve_model_data_config

    if model_dir.name in ("config.json", "model.safetensors") and model_dir.is_file():
        model_dir = model_dir.parent
    fix = "pass the final/ folder of a finished run (<checkpoint-dir>/final)"
    if not model_dir.is_dir():
        raise PredictError(f"model dir {model_dir} does not exist or is not a folder; {fix}")
    cfg_path, weights = model_dir / "config.json", model_dir / "model.safetensors"
    if not cfg_path.is_file():
        raise PredictError(f"{model_dir} has no config.json, so it is not an exported model; {fix}")
    if not weights.is_file():
        raise PredictError(f"{model_dir} has no model.safetensors (an incomplete export?); {fix}")
    try:
        cfg = json.loads(cfg_path.read_text())
        arch, num_classes, pcfg = cfg["architecture"], int(cfg["num_classes"]), dict(cfg["pretrained_cfg"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PredictError(
            f"{cfg_path} is not a kubetune export's config (architecture, num_classes, pretrained_cfg): "
            f"{type(e).__name__}: {e}; re-export it with kubetune-train"
        ) from e
    if not timm.is_model(arch):
        raise PredictError(
            f"{cfg_path}: architecture {arch!r} is not a model of timm {timm.__version__}; "
            "install the timm version the model was trained with"
        )
    try:
        model = timm.create_model(
            arch,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=pcfg | {"file": str(weights)},
        )
    except Exception as e:  # safetensors, torch and timm raise many types for a bad file or cfg
        raise PredictError(f"cannot load {weights} with {cfg_path}: {type(e).__name__}: {e}") from e
    model.eval().to(device)
    data_cfg = resolve_model_data_config(model)
    labels = [str(x) for x in (cfg.get("label_names") or pcfg.get("label_names") or [])]
    if len(labels) != num_classes:
        log.warning(
            "%s: %d label_names for %d classes; using class indices", cfg_path, len(labels), num_classes
        )
        labels = [str(i) for i in range(num_classes)]
    return Loaded(model, create_transform(**data_cfg), labels, dict(data_cfg))


def _images_under(folder: Path) -> list[Path]:
    from kubetune_trainer.data import IMAGE_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def collect(inputs: list[Path], labels: list[str], labelled: bool | None) -> list[Item]:
    """Images to classify, in order; a scored folder's images carry their class folder's name."""
    known = set(labels)
    items: list[Item] = []
    for root in inputs:
        if root.is_file():
            items.append(Item(root))  # named explicitly: tried whatever its extension
            continue
        if not root.is_dir():
            raise PredictError(f"input {root} does not exist; pass image files or folders")
        classes = _class_folders(root)
        unknown = [c.name for c in classes if c.name not in known]
        # auto: a folder of class folders is scored; one whose folders are partly classes is a mistake
        if unknown and (labelled or (labelled is None and len(unknown) < len(classes))):
            shown = labels if len(labels) <= 20 else [*labels[:20], "..."]
            raise PredictError(
                f"{root}: class folders {unknown} are not among the model's labels {shown}; "
                "rename or remove them, or pass --no-labelled to classify without scoring"
            )
        score = labelled if labelled is not None else bool(classes) and not unknown
        if not score:
            items += [Item(p) for p in _images_under(root)]
            continue
        loose = [p for p in _images_under(root) if p.parent == root]
        if loose:
            log.warning(
                "%d images directly in %s have no class folder: classified, not scored", len(loose), root
            )
        items += [Item(p) for p in loose]
        for c in classes:
            items += [Item(p, c.name) for p in _images_under(c)]
    return items


class _ImageFiles:
    """Decodes like the trainer (PIL, convert RGB, the eval transform); a failure is reported, not raised."""

    def __init__(self, items: list[Item], transform: Any) -> None:
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Any, str | None]:
        from PIL import Image

        try:
            with Image.open(self.items[i].path) as img:
                return i, self.transform(img.convert("RGB")), None
        except Exception as e:  # PIL raises many types for a bad or truncated file
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch: list[tuple[int, Any, str | None]]) -> list[tuple[int, Any, str | None]]:
    return batch


def predict(loaded: Loaded, items: list[Item], args: argparse.Namespace) -> list[Prediction]:
    """Predictions for every readable image (in input order); each unreadable one is skipped with a warning."""
    import torch
    from torch.utils.data import DataLoader

    loader: DataLoader[tuple[int, Any, str | None]] = DataLoader(
        _ImageFiles(items, loaded.transform),  # type: ignore[arg-type]
        batch_size=args.batch_size,
        num_workers=args.workers,
        collate_fn=_collate,
    )
    k = min(args.top_k, len(loaded.labels))
    k5 = min(5, len(loaded.labels))
    out: list[Prediction] = []
    with torch.inference_mode():
        for batch in loader:
            good = []
            for i, x, err in batch:
                if err is None:
                    good.append((i, x))
                else:
                    log.warning("skipping unreadable image %s: %s", items[i].path, err)
            if not good:
                continue
            x = torch.stack([t for _, t in good]).to(args.device)
            probs = loaded.model(x).float().softmax(dim=1).cpu()
            p, idx = probs.topk(max(k, k5), dim=1)
            for row, (i, _) in enumerate(good):
                names = [loaded.labels[j] for j in idx[row].tolist()]
                top = list(zip(names[:k], p[row, :k].tolist(), strict=True))
                out.append(Prediction(items[i].path, items[i].true_label, top, names[:k5]))
    return out


def scores(preds: list[Prediction], labels: list[str]) -> dict[str, Any] | None:
    """Top-1, top-5 and per-class top-1 over the scored predictions; None when there are none."""
    scored = [p for p in preds if p.true_label is not None]
    if not scored:
        return None
    per: dict[str, list[int]] = {}
    top1 = top5 = 0
    for p in scored:
        hit = p.top5[0] == p.true_label
        top1 += hit
        top5 += p.true_label in p.top5
        counts = per.setdefault(str(p.true_label), [0, 0])
        counts[0] += 1
        counts[1] += hit
    n = len(scored)
    return {
        "images": n,
        "top1": top1 / n,
        "top5": top5 / n,
        "per_class": {c: {"images": per[c][0], "top1": per[c][1] / per[c][0]} for c in labels if c in per},
    }


def score_table(s: dict[str, Any]) -> str:
    """A readable summary for stderr."""
    n = s["images"]
    lines = [
        f"scored {n} images: top-1 {s['top1']:.4f} ({round(s['top1'] * n)}/{n}), "
        f"top-5 {s['top5']:.4f} ({round(s['top5'] * n)}/{n})",
        f"{'class':<20} {'images':>7} {'top-1':>7}",
    ]
    for c, v in s["per_class"].items():
        lines.append(f"{c:<20} {v['images']:>7} {v['top1']:>7.4f}")
    return "\n".join(lines)


def render(preds: list[Prediction], fmt: str, top_k: int, s: dict[str, Any] | None, model_dir: Path) -> str:
    """CSV (one row per image, top-k as numbered columns) or JSON ({"model", "predictions", "scores"})."""
    with_truth = any(p.true_label is not None for p in preds)
    if fmt == "json":
        rows = []
        for p in preds:
            row: dict[str, Any] = {"path": str(p.path)}
            if with_truth:
                row["true_label"] = p.true_label
            row |= {"label": p.top[0][0], "probability": round(p.top[0][1], 6)}
            row["top_k"] = [{"label": lab, "probability": round(pr, 6)} for lab, pr in p.top]
            rows.append(row)
        return json.dumps({"model": str(model_dir), "predictions": rows, "scores": s}, indent=2) + "\n"
    k = max((len(p.top) for p in preds), default=min(top_k, 1))
    header = ["path", *(["true_label"] if with_truth else []), "label", "probability"]
    for i in range(1, k + 1):
        header += [f"top{i}_label", f"top{i}_probability"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for p in preds:
        row_: list[str] = [str(p.path), *([p.true_label or ""] if with_truth else [])]
        row_ += [p.top[0][0], f"{p.top[0][1]:.6f}"]
        for lab, pr in p.top:
            row_ += [lab, f"{pr:.6f}"]
        w.writerow(row_)
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for path in args.inputs:  # before the model loads: a typo should not cost that wait
        if not path.exists():
            raise PredictError(f"input {path} does not exist; pass image files or folders")
    loaded = load_export(args.model_dir, args.device)
    items = collect(args.inputs, loaded.labels, args.labelled)
    if not items:
        raise PredictError(f"no images in {', '.join(map(str, args.inputs))}; pass image files or folders")
    preds = predict(loaded, items, args)
    if not preds:
        raise PredictError(f"none of the {len(items)} images could be read (see the warnings above)")
    if len(preds) < len(items):
        log.warning("skipped %d unreadable images of %d", len(items) - len(preds), len(items))
    s = scores(preds, loaded.labels)
    text = render(preds, args.format, args.top_k, s, args.model_dir)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
        except OSError as e:
            raise PredictError(f"cannot write --output {args.output}: {e}") from e
    if s is not None:
        print(score_table(s), file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="kubetune-predict: %(levelname)s: %(message)s")
    args = parse_args(argv)  # before importing torch and timm, so --help is fast
    try:
        return run(args)
    except PredictError as e:
        log.error("%s", e)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.error("prediction failed: %s: %s\n%s", type(e).__name__, e, traceback.format_exc())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
