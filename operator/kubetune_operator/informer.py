"""A list + watch of one collection kept in a store, as client-go's reflector does.

kopf's watches re-list after a 410 Gone or a broken stream, but a re-list brings no DELETED for an object
that vanished in the gap, and kopf does not say when a re-list happened or ended. Pods are what a
disruption removes, so the operator owns the pod watch: after every (re)list, what the store holds but
the list lacks is reported DELETED. A periodic re-list bounds any other miss.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubetune_operator.kube import ApiError, Kube

log = logging.getLogger(__name__)
Handler = Callable[[str, Mapping[str, Any]], None]


def _key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def diff_list(
    store: Mapping[str, Mapping[str, Any]], items: list[Mapping[str, Any]]
) -> list[tuple[str, Mapping[str, Any]]]:
    """The events a fresh list means against what the store held: ADDED/MODIFIED for new or changed
    objects, DELETED (with the last state seen) for those the list lacks. Pure."""
    events: list[tuple[str, Mapping[str, Any]]] = []
    listed = set()
    for item in items:
        key = _key(item)
        listed.add(key)
        old = store.get(key)
        if old is None:
            events.append(("ADDED", item))
        elif _rv(old) != _rv(item):
            events.append(("MODIFIED", item))
    events.extend(("DELETED", obj) for key, obj in store.items() if key not in listed)
    return events


class Informer:
    """Watches `path` (a collection URL, e.g. /api/v1/pods) filtered by `label_selector`, calling
    `handler(event_type, object)` for every change, re-lists included."""

    def __init__(
        self,
        kube: Kube,
        path: str,
        handler: Handler,
        label_selector: str = "",
        watch_seconds: int = 300,
        relist_seconds: float = 600.0,
        retry_seconds: float = 1.0,
    ) -> None:
        self.kube, self.path, self.handler = kube, path, handler
        self.label_selector = label_selector
        self.watch_seconds, self.relist_seconds, self.retry_seconds = (
            watch_seconds,
            relist_seconds,
            retry_seconds,
        )
        self.store: dict[str, Mapping[str, Any]] = {}
        self.relists = 0
        self.synced = asyncio.Event()  # set once the first list is in the store

    def remember(self, obj: Mapping[str, Any]) -> None:
        """Put an object read outside the watch (a GET) in the store when this informer covers it, so a
        later re-list reports it DELETED should it vanish."""
        meta = obj.get("metadata") or {}
        if "/namespaces/" in self.path and f"/namespaces/{meta.get('namespace')}/" not in self.path:
            return
        key = _key(obj)
        if key not in self.store:
            self.store[key] = obj

    async def run(self) -> None:
        """Forever: list, then watch from the list's resourceVersion until the stream is stale or broken."""
        while True:
            try:
                rv = await self.relist()
                await self._watch(rv)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the API being unreachable must not end the watch
                log.warning("watch %s: %s; re-listing in %.0fs", self.path, err, self.retry_seconds)
                await asyncio.sleep(self.retry_seconds)

    async def relist(self) -> str:
        """List everything (paged), report the difference to the store, and return the list's resourceVersion."""
        items: list[Mapping[str, Any]] = []
        params = {"limit": "500"}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        while True:
            page = await self.kube.request("GET", self.path, params=params)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                break
            params = {**params, "continue": token}
        rv = str((page.get("metadata") or {}).get("resourceVersion") or "")
        events = diff_list(self.store, items)
        self.store = {_key(i): i for i in items}
        self.relists += 1
        gone = sum(1 for t, _ in events if t == "DELETED")
        if self.relists > 1 and gone:
            log.info("re-list of %s: %d object(s) vanished while the watch was down", self.path, gone)
        for event_type, obj in events:
            self.handler(event_type, obj)
        self.synced.set()
        return rv

    async def _watch(self, rv: str) -> None:
        """Stream changes from `rv`; returns when a re-list is due (410 Gone, or the periodic re-list)."""
        relist_at = time.monotonic() + self.relist_seconds
        while time.monotonic() < relist_at:
            params = {
                "watch": "1",
                "resourceVersion": rv,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(self.watch_seconds),
            }
            if self.label_selector:
                params["labelSelector"] = self.label_selector
            async for event in self.kube.stream(self.path, params, read_timeout=self.watch_seconds + 30):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        log.info("watch %s: %s; re-listing", self.path, obj.get("message", "410 Gone"))
                        return
                    raise ApiError(
                        int(obj.get("code") or 500), str(obj.get("reason", "")), str(obj.get("message", ""))
                    )
                rv = _rv(obj) or rv
                if kind == "BOOKMARK":
                    continue
                key = _key(obj)
                if kind == "DELETED":
                    self.store.pop(key, None)
                else:
                    self.store[key] = obj
                self.handler(str(kind), obj)
