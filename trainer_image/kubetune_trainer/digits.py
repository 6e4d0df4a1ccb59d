"""`python -m kubetune_trainer.digits OUT [--classes 0-9]`: scikit-learn's 8x8 digits as an ImageFolder of PNGs.

A real (if small) image dataset that needs no download, for examples/local-digits.yaml and the tests.
Needs scikit-learn (a dev dependency, not part of the trainer image).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path


def write_digits(root: Path, classes: Iterable[int] = range(10)) -> Path:
    """Write <root>/<digit>/<index>.png for every sample whose label is in `classes`; returns root."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    wanted = set(classes)
    ds = load_digits()
    for i, (img, label) in enumerate(zip(ds.images, ds.target, strict=True)):
        if int(label) not in wanted:
            continue
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * (255 / 16)).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubetune_trainer.digits", description=__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--classes", default="0-9", help="a range like 0-4 (inclusive)")
    args = p.parse_args(argv)
    lo, _, hi = args.classes.partition("-")
    root = write_digits(args.out, range(int(lo), int(hi or lo) + 1))
    print(f"wrote {sum(1 for _ in root.rglob('*.png'))} images to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
