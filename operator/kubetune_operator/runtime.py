"""Controller plumbing with no FineTuneJob knowledge: a de-duplicating work queue and leader election."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from kubetune_operator.kube import ApiError, Kube
from kubetune_operator.status import fmt_time

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys to reconcile. A key is never processed by two workers at once; a key added while it is
    being processed runs again afterwards (client-go's workqueue semantics)."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}

    def add(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Add `key` after `delay` seconds; an earlier pending timer for the key wins."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: K) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    async def get(self) -> K:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: K) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return self._queue.qsize()


@dataclass(frozen=True)
class ElectionTiming:
    """client-go's three leader-election durations, in seconds; the defaults are controller-runtime's."""

    lease_seconds: int = 15
    """How long a follower waits, from the last change of the Lease record it saw, before taking over."""
    renew_deadline_seconds: float = 10.0
    """How long the leader keeps acting without a successful renew. Shorter than `lease_seconds`, so it
    has stopped before any follower can deem the Lease expired."""
    retry_period_seconds: float = 2.0
    """Seconds between attempts to acquire or renew."""

    def problem(self) -> str | None:
        """What is wrong with these durations, naming the CLI flag to fix; None when they are usable."""
        if self.lease_seconds < 1:
            return f"--lease-seconds must be at least 1, got {self.lease_seconds}"
        if self.retry_period_seconds <= 0:
            return f"--retry-period-seconds must be > 0, got {self.retry_period_seconds:g}"
        if self.renew_deadline_seconds >= self.lease_seconds:
            return (
                f"--renew-deadline-seconds ({self.renew_deadline_seconds:g}) must be less than "
                f"--lease-seconds ({self.lease_seconds}): the leader must stop before a follower takes over"
            )
        if self.renew_deadline_seconds <= self.retry_period_seconds:
            return (
                f"--renew-deadline-seconds ({self.renew_deadline_seconds:g}) must be greater than "
                f"--retry-period-seconds ({self.retry_period_seconds:g}): else one failed renew loses the Lease"
            )
        return None


@dataclass(frozen=True)
class LeaseRecord:
    """The parts of a Lease's spec whose change shows that its holder is alive."""

    holder: str
    duration_seconds: int
    renew_time: str
    transitions: int

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], default_duration: int) -> LeaseRecord:
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            duration_seconds=int(spec.get("leaseDurationSeconds") or default_duration),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


@dataclass(frozen=True)
class Observation:
    """A Lease record and the local monotonic time at which this replica first saw it."""

    record: LeaseRecord
    observed_at: float

    def seen(self, record: LeaseRecord, now: float) -> Observation:
        """The observation after reading `record` at `now`: the clock restarts only when it changed."""
        return self if record == self.record else Observation(record, now)

    def expired(self, now: float) -> bool:
        """Expired by our own clock: no change seen for the record's lease duration. The holder's
        renewTime is never compared with our wall clock, so clock skew between replicas does not matter."""
        return self.observed_at + self.record.duration_seconds < now

    def free_for(self, identity: str, now: float) -> bool:
        """May `identity` write itself into the Lease? When released (no holder), already ours, or expired."""
        return not self.record.holder or self.record.holder == identity or self.expired(now)


def still_leading(renewed_at: float | None, now: float, renew_deadline: float) -> bool:
    """Should the leader still act? Only within `renew_deadline` of the start of its last successful
    renew (the start, not the reply: the server may have written the record any time in between)."""
    return renewed_at is not None and now - renewed_at < renew_deadline


class LeaderElector:
    """A coordination.k8s.io Lease, as client-go's leaderelection: only the holder reconciles.

    The holder renews every `retry_period_seconds` and stops acting once `renew_deadline_seconds` pass
    without a successful renew, by its own monotonic clock. A follower takes over when the Lease is
    released or when it has seen no change of the record for `leaseDurationSeconds` by its own clock.

    On a clean stop (kopf's cleanup on SIGTERM) the leader stops acting and then releases the Lease
    (empty holder, duration 1 s), so a follower takes over within one retry period. A leader killed
    without cleanup (SIGKILL, OOM, node loss) cannot release: followers then wait up to the lease
    duration (plus one retry period) after the last renew they saw. That wait is the price of never
    having two replicas act at once.
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        on_change: Callable[[bool], Awaitable[None]],
        timing: ElectionTiming | None = None,
        stop_now: Callable[[], None] | None = None,
    ) -> None:
        """`stop_now` (optional) runs synchronously the moment the renew deadline passes, before the event
        loop runs anything else that is already due (a worker's requeue timer after the process was
        frozen, say); `on_change(False)` follows as a task."""
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.on_change, self.stop_now = on_change, stop_now
        self.timing = timing or ElectionTiming()
        self.clock: Callable[[], float] = time.monotonic
        self.is_leader = False
        self._renewed_at: float | None = None  # start of the last successful acquire or renew
        self._observed: Observation | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._stepping_down: asyncio.Task[None] | None = None

    @property
    def _path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    async def run(self, stopped: asyncio.Event) -> None:
        try:
            while not stopped.is_set():
                started = self.clock()
                try:
                    # Bounded like client-go's renew: a hung request must not outlive the deadline.
                    ok = await asyncio.wait_for(
                        self._try_acquire_or_renew(), self.timing.renew_deadline_seconds
                    )
                except Exception as err:  # the API being unreachable must not kill the elector
                    log.warning("leader election: %s", str(err) or type(err).__name__)
                    ok = False
                if ok:
                    self._renewed_at = started
                await self._update()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), timeout=self.timing.retry_period_seconds)
        finally:
            await self._step_down("stopping")
            await self._release()

    async def _update(self) -> None:
        leading = still_leading(self._renewed_at, self.clock(), self.timing.renew_deadline_seconds)
        if leading:
            self._arm_deadline()
        if leading and not self.is_leader:
            if self._stepping_down is not None:
                await self._stepping_down
            self.is_leader = True
            log.info("leader election: became leader of %s/%s", self.namespace, self.name)
            await self.on_change(True)
        elif not leading and self.is_leader:
            await self._step_down(f"not renewed within {self.timing.renew_deadline_seconds:g}s")

    def _arm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        assert self._renewed_at is not None
        delay = self._renewed_at + self.timing.renew_deadline_seconds - self.clock()
        self._deadline = asyncio.get_running_loop().call_later(max(0.0, delay), self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.is_leader and not still_leading(
            self._renewed_at, self.clock(), self.timing.renew_deadline_seconds
        ):
            self._lose(f"not renewed within {self.timing.renew_deadline_seconds:g}s")
            self._stepping_down = asyncio.ensure_future(self.on_change(False))

    def _lose(self, why: str) -> None:
        self.is_leader = False
        log.warning("leader election: lost leadership (%s)", why)
        if self.stop_now is not None:
            self.stop_now()

    async def _step_down(self, why: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.is_leader:
            self._lose(why)
            await self.on_change(False)
        if self._stepping_down is not None:
            await self._stepping_down
            self._stepping_down = None

    async def _try_acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        mine = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.timing.lease_seconds,
            "renewTime": _micro(now),
        }
        lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        if lease is None:
            spec = {**mine, "acquireTime": _micro(now), "leaseTransitions": 0}
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec,
            }
            try:
                created = await self.kube.create(body)
            except ApiError as err:
                if err.status == 409:
                    return False
                raise
            if created:
                self._saw(spec)
            return created
        current = lease.get("spec") or {}
        observed = self._saw(current)
        if not observed.free_for(self.identity, self.clock()):
            return False
        new_spec = {**current, **mine}
        if observed.record.holder != self.identity:
            new_spec["acquireTime"] = _micro(now)
            new_spec["leaseTransitions"] = observed.record.transitions + 1
            log.info(
                "leader election: taking the Lease from %s (%s)",
                observed.record.holder or "nobody",
                f"unchanged for {self.clock() - observed.observed_at:.1f}s"
                if observed.record.holder
                else "released",
            )
        lease["spec"] = new_spec
        try:
            # resourceVersion in the body: a stale writer (another replica was quicker) gets 409.
            await self.kube.request("PUT", self._path, lease)
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        self._saw(new_spec)
        return True

    def _saw(self, spec: Mapping[str, Any]) -> Observation:
        record = LeaseRecord.from_spec(spec, self.timing.lease_seconds)
        now = self.clock()
        self._observed = self._observed.seen(record, now) if self._observed else Observation(record, now)
        return self._observed

    async def _release(self) -> None:
        """client-go's ReleaseOnCancel: hand the Lease back so a follower need not wait for it to expire."""
        try:
            async with asyncio.timeout(self.timing.renew_deadline_seconds):
                lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
                if not lease or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                    return
                now = _micro(datetime.now(UTC))
                lease["spec"].update(
                    holderIdentity="", leaseDurationSeconds=1, renewTime=now, acquireTime=now
                )
                await self.kube.request("PUT", self._path, lease)
                log.info("leader election: released %s/%s", self.namespace, self.name)
        except Exception as err:
            log.warning("leader election: could not release the lease: %s", str(err) or type(err).__name__)


def _micro(t: datetime) -> str:
    """MicroTime, as Lease fields require."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


__all__ = [
    "ElectionTiming",
    "LeaderElector",
    "LeaseRecord",
    "Observation",
    "WorkQueue",
    "fmt_time",
    "still_leading",
]
