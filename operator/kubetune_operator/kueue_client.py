"""The controller's side of Kueue: is the Workload API served, a watch of the job Workloads, the reads a
queued job's plan needs (its Workload, its priority class, the admitted flavors) and the Workload writes
the plan asks for. What they mean is decided in `queueing` (pure)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubetune_operator import builders, kueue
from kubetune_operator.api import FineTuneJob, JobKey
from kubetune_operator.informer import Informer
from kubetune_operator.kube import ApiError, Kube

log = logging.getLogger(__name__)


class KueueClient:
    def __init__(
        self, kube: Kube, mode: str, namespaces: tuple[str, ...], wake: Callable[[JobKey], None]
    ) -> None:
        self.kube = kube
        self.mode = mode  # auto | off
        self.enabled = False
        self.wake = wake
        self.workloads: dict[JobKey, dict[str, Any]] = {}
        self.flavors: dict[str, kueue.Flavor] = {}
        base = f"/apis/{kueue.API_VERSION}"
        paths = (
            [f"{base}/namespaces/{ns}/workloads" for ns in namespaces]
            if namespaces
            else [f"{base}/workloads"]
        )
        self.informers = [Informer(kube, p, self.event, label_selector=builders.LABEL_JOB) for p in paths]
        # The flavors, watched: a ResourceFlavor changed while the operator runs applies to the next
        # attempt's pods (a GET covers one not in the store yet).
        self.informers.append(Informer(kube, f"{base}/resourceflavors", self.flavor_event))

    async def probe(self) -> bool:
        """Whether Kueue's Workload API is served; said once in the log either way."""
        if self.mode == "off":
            log.info("Kueue integration off (--kueue=off): the kueue.x-k8s.io/queue-name label is ignored")
            return False
        try:
            doc = await self.kube.request("GET", f"/apis/{kueue.API_VERSION}")
        except ApiError as err:
            log.info(
                "Kueue's Workload API (%s) is not served (HTTP %s): jobs labelled %s run without queueing",
                kueue.API_VERSION,
                err.status,
                kueue.QUEUE_LABEL,
            )
            return False
        if not any(r.get("name") == "workloads" for r in doc.get("resources") or []):
            log.info("Kueue integration off: %s serves no workloads resource", kueue.API_VERSION)
            return False
        try:
            await self.kube.request("GET", self.informers[0].path, params={"limit": "1"})
        except ApiError as err:
            if err.status != 403:
                raise
            log.warning(
                "Kueue integration off: Kueue is installed but this operator may not list Workloads "
                "(install the chart with kueue.enabled=true, or run with --kueue=off): %s",
                err.message,
            )
            return False
        self.enabled = True
        log.info("Kueue integration on: jobs labelled %s are queued as Workloads", kueue.QUEUE_LABEL)
        return True

    def event(self, event_type: str, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "FineTuneJob"), None)
        if owner is None:
            return
        key = (meta.get("namespace", ""), owner.get("name", ""))
        if event_type == "DELETED":
            if (self.workloads.get(key) or {}).get("metadata", {}).get("uid") == meta.get("uid"):
                self.workloads.pop(key, None)
        else:
            self.workloads[key] = copy.deepcopy(dict(body))
        self.wake(key)

    def flavor_event(self, event_type: str, body: Mapping[str, Any]) -> None:
        name = str((body.get("metadata") or {}).get("name") or "")
        if event_type == "DELETED":
            self.flavors.pop(name, None)
        else:
            self.flavors[name] = kueue.flavor(body)

    async def view(self, key: JobKey, job: FineTuneJob, body: Mapping[str, Any]) -> kueue.QueueView | None:
        """The queue side of one job: None when it is not queued (no label, or Kueue off)."""
        local_queue = kueue.queue_name(body)
        if not self.enabled or local_queue is None:
            return None
        raw = self.workloads.get(key)
        wl = kueue.workload_view(raw) if raw is not None else None
        if wl is not None and wl.owner_uid != job.ref.uid:
            wl = None  # an earlier job's of the same name, waiting for the garbage collector
        if wl is None:
            # Not yet in the cache: our own create may be ahead of the watch.
            got = await self.kube.get(
                kueue.API_VERSION, "Workload", job.ref.namespace, kueue.workload_name(job)
            )
            if got is not None:
                self.workloads[key] = got
                wl = kueue.workload_view(got)
        priority_class = kueue.priority_class(body)
        priority, error = None, None
        if wl is None and priority_class:
            wpc = await self.kube.get(kueue.API_VERSION, "WorkloadPriorityClass", None, priority_class)
            if wpc is None:
                error = (
                    f"WorkloadPriorityClass {priority_class!r} (label {kueue.PRIORITY_LABEL}) does not exist: "
                    "create it or fix the label"
                )
            else:
                priority = int(wpc.get("value") or 0)
        flavors = {}
        for name in wl.flavors if wl is not None and wl.admitted else ():
            if name not in self.flavors:
                rf = await self.kube.get(kueue.API_VERSION, "ResourceFlavor", None, name)
                if rf is not None:
                    self.flavors[name] = kueue.flavor(rf)
            if name in self.flavors:
                flavors[name] = self.flavors[name]
        return kueue.QueueView(
            local_queue=local_queue,
            workload=wl,
            priority_class=priority_class,
            priority=priority,
            flavors=flavors,
            error=error,
        )

    async def apply(
        self,
        key: JobKey,
        job: FineTuneJob,
        create: Mapping[str, Any] | None,
        patch: Mapping[str, Any] | None,
        active: bool | None = None,
    ) -> bool:
        """The plan's Workload writes; False when a write lost a race (re-plan)."""
        if create is not None:
            await self.kube.create(create)
        path = (
            f"/apis/{kueue.API_VERSION}/namespaces/{job.ref.namespace}/workloads/{kueue.workload_name(job)}"
        )
        if active is not None and not await self._patch(key, path, {"spec": {"active": active}}):
            return False
        if patch is None:
            return True
        return await self._patch(key, f"{path}/status", {"status": dict(patch)})

    async def _patch(self, key: JobKey, path: str, doc: Mapping[str, Any]) -> bool:
        """A merge patch guarded by the resourceVersion the plan was made from."""
        raw = self.workloads.get(key) or {}
        meta = raw.get("metadata") or {}
        body = {"metadata": {"resourceVersion": meta.get("resourceVersion")}, **doc}
        try:
            updated = await self.kube.request(
                "PATCH", path, body, content_type="application/merge-patch+json"
            )
        except ApiError as err:
            if err.status in (404, 409):
                log.info("%s/%s: Workload changed underneath (%s); re-planning", *key, err.status)
                return False
            raise
        self.workloads[key] = updated
        return True
