"""`python -m bench [name ...]`: run benchmarks (each module bench/<name>.py exposing run() -> dict)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

from bench._common import print_table, write_result


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = argv or available()
    unknown = sorted(set(names) - set(available()))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available()}", file=sys.stderr)
        return 2
    if not names:
        print("no benchmarks exist yet", file=sys.stderr)
        return 1
    rows: list[tuple[str, str, str]] = []
    for name in names:
        mod = importlib.import_module(f"bench.{name}")
        result = mod.run()
        path = write_result(name, result)
        for key, value in sorted(result.items()):
            if isinstance(value, (int, float, str, bool)):
                rows.append((name, key, f"{value:.4g}" if isinstance(value, float) else str(value)))
        print(f"[bench] {name} -> {path}", file=sys.stderr)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
