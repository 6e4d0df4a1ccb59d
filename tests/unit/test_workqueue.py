"""The controller's work queue: de-duplication, no concurrent processing of a key, delayed adds."""

from __future__ import annotations

import asyncio

import pytest

from kubetune_operator.runtime import WorkQueue

pytestmark = pytest.mark.unit


def test_duplicates_collapse_and_a_key_added_while_active_runs_again():
    async def scenario() -> list[str]:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        q.add("a")
        q.add("b")
        assert len(q) == 2
        key = await q.get()
        q.add(key)  # changed while being processed: must run again, but not concurrently
        assert len(q) == 1
        q.done(key)
        order = [key]
        while len(q):
            k = await q.get()
            order.append(k)
            q.done(k)
        return order

    assert asyncio.run(scenario()) == ["a", "b", "a"]


def test_add_after_keeps_the_earliest_timer():
    async def scenario() -> float:
        q: WorkQueue[str] = WorkQueue()
        loop = asyncio.get_running_loop()
        start = loop.time()
        q.add_after("a", 5.0)
        q.add_after("a", 0.05)
        q.add_after("a", 1.0)  # later than the pending 0.05 s timer: ignored
        await asyncio.wait_for(q.get(), timeout=2)
        return loop.time() - start

    assert asyncio.run(scenario()) < 0.9
