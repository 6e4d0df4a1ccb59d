"""The resumable sampler: seeded per-epoch order, sharding, and exact mid-epoch restarts."""

from __future__ import annotations

import pytest

from kubetune_trainer.data import ResumableBatchSampler, seeded_split

pytestmark = pytest.mark.unit


def test_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = ResumableBatchSampler(50, 4, seed=1), ResumableBatchSampler(50, 4, seed=1)
    a.set_position(3)
    b.set_position(3)
    assert list(a) == list(b)
    b.set_position(4)
    assert list(a) != list(b)
    assert list(a) != list(ResumableBatchSampler(50, 4, seed=2))


def test_skipping_batches_reproduces_the_rest_exactly() -> None:
    full = ResumableBatchSampler(50, 4, seed=7)
    full.set_position(2)
    batches = list(full)
    assert len(batches) == 12 and all(len(b) == 4 for b in batches)  # 50 // 4, last partial dropped
    for k in range(len(batches) + 1):
        part = ResumableBatchSampler(50, 4, seed=7)
        part.set_position(2, k)
        assert list(part) == batches[k:]
        assert len(part) == len(batches) - k


def test_ranks_get_disjoint_equal_shards() -> None:
    shards = [ResumableBatchSampler(51, 5, seed=0, rank=r, world_size=2) for r in range(2)]
    seen = [[i for batch in s for i in batch] for s in shards]
    assert len(seen[0]) == len(seen[1]) == 25
    assert not set(seen[0]) & set(seen[1])


def test_seeded_split_is_stable_and_disjoint() -> None:
    train, val = seeded_split(100, 0.2, seed=3)
    assert (train, val) == seeded_split(100, 0.2, seed=3)
    assert len(val) == 20 and not set(train) & set(val) and len(train) + len(val) == 100
