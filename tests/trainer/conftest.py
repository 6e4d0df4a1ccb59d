"""Fixtures for trainer tests (helpers live in helpers.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from .helpers import Job


@pytest.fixture
def job_factory(tmp_path: Path) -> Callable[..., Job]:
    counter = iter(range(1000))

    def make(spec: dict[str, Any], name: str = "job") -> Job:
        root = tmp_path / f"{name}-{next(counter)}"
        root.mkdir()
        return Job(root, spec, name)

    return make
