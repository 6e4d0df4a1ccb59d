#!/usr/bin/env bash
# The whole suite: static checks, then every pytest marker (unit, trainer, cluster).
# pytest's exit 5 ("no tests collected") is non-zero and fails this script, as it must.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
