"""Controller plumbing with no FineTuneJob knowledge: a de-duplicating work queue and leader election."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from kubetune_operator.kube import ApiError, Kube
from kubetune_operator.status import fmt_time, parse_time

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


class LeaderElector:
    """A coordination.k8s.io Lease: only the holder reconciles, so two replicas never both act.

    Followers keep their caches warm and take over within `lease_seconds` of the leader going away.
    """

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        on_change: Callable[[bool], Awaitable[None]],
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
    ) -> None:
        self.kube, self.namespace, self.name, self.identity = kube, namespace, name, identity
        self.on_change = on_change
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.is_leader = False

    async def run(self, stopped: asyncio.Event) -> None:
        while not stopped.is_set():
            try:
                leader = await self._try_acquire()
            except Exception as err:  # the API being briefly unreachable must not kill the elector
                log.warning("leader election: %s", err)
                leader = self.is_leader and self._still_valid()
            if leader != self.is_leader:
                self.is_leader = leader
                self._acquired_at = time.monotonic()
                log.info("leader election: %s", "became leader" if leader else "lost leadership")
                await self.on_change(leader)
            if leader:
                self._renewed_at = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopped.wait(), timeout=self.renew_seconds)
        if self.is_leader:
            await self._release()

    def _still_valid(self) -> bool:
        return time.monotonic() - getattr(self, "_renewed_at", 0.0) < self.lease_seconds

    async def _try_acquire(self) -> bool:
        now = datetime.now(UTC)
        lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.lease_seconds,
            "renewTime": _micro(now),
        }
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _micro(now), "leaseTransitions": 0},
            }
            try:
                return await self.kube.create(body)
            except ApiError as err:
                if err.status == 409:
                    return False
                raise
        current = lease.get("spec") or {}
        holder = current.get("holderIdentity")
        renewed = parse_time(current.get("renewTime")) or now
        expired = (
            renewed + timedelta(seconds=int(current.get("leaseDurationSeconds") or self.lease_seconds)) < now
        )
        if holder and holder != self.identity and not expired:
            return False
        new_spec = {**current, **spec}
        if holder != self.identity:
            new_spec["acquireTime"] = _micro(now)
            new_spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
        lease["spec"] = new_spec
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"
        try:
            await self.kube.request("PUT", path, lease)  # resourceVersion in the body: stale writers get 409
            return True
        except ApiError as err:
            if err.status == 409:
                return False
            raise

    async def _release(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"
        try:
            lease = await self.kube.get("coordination.k8s.io/v1", "Lease", self.namespace, self.name)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = None
                await self.kube.request("PUT", path, lease)
        except Exception as err:
            log.warning("leader election: could not release the lease: %s", err)


def _micro(t: datetime) -> str:
    """MicroTime, as Lease fields require."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


__all__ = ["LeaderElector", "WorkQueue", "fmt_time"]
