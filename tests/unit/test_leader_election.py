"""Leader election's pure decisions, driven with fake monotonic clock values: when a follower may take
the Lease, when the leader must stop acting, and which durations the CLI refuses; and the elector's loop
over an in-memory Lease whose API can be cut off."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable
from typing import Any, cast

import pytest

from kubetune_operator import cli
from kubetune_operator.kube import ApiError, Kube
from kubetune_operator.runtime import ElectionTiming, LeaderElector, LeaseRecord, Observation, still_leading

pytestmark = pytest.mark.unit


def record(holder: str = "a", renew: str = "2024-01-01T00:00:00.000000Z", duration: int = 15) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration_seconds=duration, renew_time=renew, transitions=0)


def test_record_from_spec_defaults_and_empty_holder():
    assert LeaseRecord.from_spec({}, 15) == LeaseRecord("", 15, "", 0)
    spec = {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": "t", "leaseTransitions": 3}
    assert LeaseRecord.from_spec(spec, 15) == LeaseRecord("", 1, "t", 3)


def test_expiry_counts_from_when_the_record_last_changed_on_our_clock():
    seen = Observation(record(), observed_at=100.0)
    # The same record read again keeps its first observation time: an unrenewed lease ages.
    assert seen.seen(record(), now=110.0) is seen
    assert not seen.expired(115.0)  # exactly the lease duration: not yet
    assert seen.expired(115.1)
    # A renew (new renewTime) restarts the clock, whatever the renewTime says about the holder's wall clock.
    renewed = seen.seen(record(renew="1970-01-01T00:00:00.000000Z"), now=114.0)
    assert renewed.observed_at == 114.0
    assert not renewed.expired(128.0)
    # So does a new holder or a transition count change.
    assert seen.seen(record(holder="b"), now=120.0).observed_at == 120.0
    bumped = LeaseRecord("a", 15, record().renew_time, 1)
    assert seen.seen(bumped, now=121.0).observed_at == 121.0


def test_expiry_uses_the_duration_written_in_the_record():
    released = Observation(record(duration=1), observed_at=50.0)
    assert released.expired(51.5)


@pytest.mark.parametrize(
    ("holder", "now", "free"),
    [
        ("other", 110.0, False),  # held and fresh
        ("other", 115.5, True),  # held, but unchanged for longer than the lease duration
        ("", 100.0, True),  # released: take it at once
        ("me", 100.0, True),  # ours already: renew
    ],
)
def test_free_for(holder, now, free):
    assert Observation(record(holder=holder), observed_at=100.0).free_for("me", now) is free


def test_the_leader_acts_only_within_the_renew_deadline_of_its_last_successful_renew():
    assert not still_leading(None, 5.0, 10.0)  # never renewed
    assert still_leading(100.0, 109.9, 10.0)
    assert not still_leading(100.0, 110.0, 10.0)
    # The margin: the leader stops (renew deadline) before a follower that saw the same renew, at the
    # same moment or later, may deem the Lease expired (lease duration).
    timing = ElectionTiming()
    follower = Observation(record(duration=timing.lease_seconds), observed_at=100.0)
    for now in (109.0, 110.0, 112.0, 115.0, 115.5):
        assert not (still_leading(100.0, now, timing.renew_deadline_seconds) and follower.expired(now))


def test_default_timing_is_usable():
    assert ElectionTiming().problem() is None
    assert ElectionTiming(lease_seconds=6, renew_deadline_seconds=4, retry_period_seconds=1).problem() is None


@pytest.mark.parametrize(
    ("timing", "flag"),
    [
        (ElectionTiming(15, 15.0, 2.0), "--renew-deadline-seconds (15) must be less than --lease-seconds"),
        (ElectionTiming(15, 20.0, 2.0), "--renew-deadline-seconds (20) must be less than --lease-seconds"),
        (ElectionTiming(15, 2.0, 2.0), "must be greater than --retry-period-seconds"),
        (ElectionTiming(15, 10.0, 0.0), "--retry-period-seconds must be > 0"),
        (ElectionTiming(0, 0.5, 0.1), "--lease-seconds must be at least 1"),
    ],
)
def test_bad_timing_names_the_flag(timing, flag):
    assert flag in (timing.problem() or "")


def test_cli_refuses_a_renew_deadline_not_shorter_than_the_lease(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--lease-seconds", "10", "--renew-deadline-seconds", "10"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--renew-deadline-seconds (10) must be less than --lease-seconds (10)" in err


def test_cli_refuses_a_negative_retry_period(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--retry-period-seconds", "-1"])
    assert exit_info.value.code == 2
    assert "--retry-period-seconds must be >= 0" in capsys.readouterr().err


class LeaseStore:
    """An in-memory Lease standing in for the API server (Kube's get/create/request); while `down`, every
    call fails as an unreachable API does."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.down = False

    def _reachable(self) -> None:
        if self.down:
            raise OSError("connection refused")

    async def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._reachable()
        return copy.deepcopy(self.lease)

    async def create(self, body: dict[str, Any]) -> bool:
        self._reachable()
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = "1"
        return True

    async def request(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._reachable()
        assert self.lease is not None and method == "PUT"
        version = self.lease["metadata"]["resourceVersion"]
        if body["metadata"]["resourceVersion"] != version:
            raise ApiError(409, "Conflict", "stale resourceVersion")
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(int(version) + 1)
        return self.lease


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_a_leader_cut_off_from_the_api_stops_at_the_renew_deadline_and_releases_on_stop():
    timing = ElectionTiming(lease_seconds=2, renew_deadline_seconds=0.5, retry_period_seconds=0.05)

    async def scenario() -> tuple[float, list[bool], list[str], dict[str, Any]]:
        store = LeaseStore()
        changes: list[bool] = []
        stops: list[str] = []

        async def on_change(leader: bool) -> None:
            changes.append(leader)

        elector = LeaderElector(
            cast(Kube, store), "ns", "lease", "me", on_change, timing, stop_now=lambda: stops.append("now")
        )
        stopped = asyncio.Event()
        task = asyncio.create_task(elector.run(stopped))
        await until(lambda: elector.is_leader)
        store.down = True
        cut = time.monotonic()
        await until(lambda: not elector.is_leader)
        lost_after = time.monotonic() - cut
        store.down = False  # the API is back: the record still names us, so we take it again
        await until(lambda: elector.is_leader)
        stopped.set()
        await task
        assert store.lease is not None
        return lost_after, changes, stops, store.lease["spec"]

    lost_after, changes, stops, spec = asyncio.run(scenario())
    # The last successful renew started at most one retry period before the cut.
    assert timing.renew_deadline_seconds - timing.retry_period_seconds - 0.02 <= lost_after
    assert lost_after < timing.renew_deadline_seconds + 0.2 < timing.lease_seconds
    assert changes == [True, False, True, False]
    assert stops == ["now", "now"]  # at the deadline, and when stopping
    assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1  # released
    assert spec["leaseTransitions"] == 0  # re-taken while still ours: no transition
