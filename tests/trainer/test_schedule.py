"""The LR schedule is a pure function of the step (so a resume needs no scheduler bookkeeping)."""

from __future__ import annotations

import pytest

from kubetune_trainer.components import lr_factor

pytestmark = pytest.mark.unit


def test_warmup_then_cosine_to_zero() -> None:
    assert [lr_factor(s, 100, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, 4, "cosine") == 1.0
    assert lr_factor(100, 100, 4, "cosine") == pytest.approx(0.0)
    assert lr_factor(52, 100, 4, "cosine") == pytest.approx(0.5)


def test_step_and_constant() -> None:
    assert [lr_factor(s, 100, 0, "step") for s in (0, 49, 50, 74, 75, 99)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01]
    )
    assert {lr_factor(s, 100, 0, "constant") for s in range(100)} == {1.0}
