"""The reconcile loop: caches fed by watches, a work queue, and reconcile = observe, plan, apply.

Jobs come from kopf's watch; pods from our own `Informer` (a re-list reports the pods that vanished
while the watch was down, which kopf cannot). Every live job is also re-checked each resync interval.

Everything that decides lives in `lifecycle.plan`; this module gathers its inputs (cached job and pods,
a direct GET when the cache may lag, dependency checks, a scrape of the trainer's metrics) and applies
its output: one status write (guarded by resourceVersion), then creates, deletes and events. The API
reads beyond the caches live in `observe`; the creates, their refusals and expectations in `children`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from kubetune_operator import builders, lifecycle, observe, pods, tensorboard
from kubetune_operator.api import API_VERSION, FineTuneJob, JobKey, SpecError, parse_job
from kubetune_operator.children import CHILD_PLURALS, Children, owner_uid
from kubetune_operator.informer import Informer
from kubetune_operator.kube import ApiError, Kube
from kubetune_operator.kueue_client import KueueClient
from kubetune_operator.metrics import OperatorMetrics, parse_trainer_metrics
from kubetune_operator.runtime import WorkQueue
from kubetune_operator.status import JobStatus, fmt_time, set_phase, status_patch

log = logging.getLogger(__name__)
COMPONENT = "kubetune-operator"


@dataclass(frozen=True)
class ControllerConfig:
    """Operator settings from the command line."""

    trainer_image: str = ""
    workers: int = 8
    scrape_interval: float = 10.0
    scrape_timeout: float = 2.0
    lifecycle: lifecycle.Settings = field(default_factory=lifecycle.Settings)
    namespaces: tuple[str, ...] = ()  # watch only these (empty: every namespace)
    resync_seconds: float = 60.0  # every live job is reconciled at least this often
    kueue: str = "auto"  # auto: queue labelled jobs through Kueue when its API is served; off


@dataclass
class _PodEntry:
    body: dict[str, Any]
    gone: bool = False
    ended_at: float | None = None  # monotonic time the pod was first seen ended or gone


@dataclass
class _Scrape:
    at: float
    progress: lifecycle.Progress
    rate: float | None = None  # steps per second between the last two scrapes


def _rv(body: Mapping[str, Any]) -> int:
    try:
        return int((body.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Controller:
    def __init__(self, kube: Kube, config: ControllerConfig) -> None:
        self.kube = kube
        self.config = config
        self.queue: WorkQueue[JobKey] = WorkQueue()
        self.jobs: dict[JobKey, dict[str, Any]] = {}
        self.pods: dict[JobKey, dict[str, _PodEntry]] = {}
        self.scrapes: dict[JobKey, _Scrape] = {}
        self.ended_at: dict[JobKey, float] = {}
        # spec.checkpoint.existingClaim -> its access modes (immutable once the claim exists).
        self.claim_modes: dict[JobKey, tuple[str, tuple[str, ...]]] = {}
        self.own_writes: dict[JobKey, int] = {}  # resourceVersion our last status write returned
        self.pod_informers = self._informers("pods", self.pod_event)
        # Creates, their refusals, and the pods created that no watch event has shown yet.
        self.children = Children(
            kube,
            {kind: self._informers(plural, lambda _t, _o: None) for kind, plural in CHILD_PLURALS.items()},
            self.pods,
        )
        self.metrics = OperatorMetrics(
            lambda: [JobStatus.parse(j.get("status")).phase for j in self.jobs.values()],
            lambda: self.kube.requests,
        )
        self.kueue = KueueClient(kube, config.kueue, config.namespaces, self.queue.add)
        self.active = asyncio.Event()  # set while this replica is the leader
        self._tasks: list[asyncio.Task[None]] = []

    # -- watch events (from kopf handlers) ---------------------------------------------------------------
    def job_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        if event_type == "DELETED":
            self.jobs.pop(key, None)
            self._forget(key)
            self.queue.forget(key)
            return
        cached = self.jobs.get(key)
        if cached is not None and cached["metadata"].get("uid") != meta.get("uid"):
            self._forget(key)  # a new job with the same name: nothing of the old one's bookkeeping applies
        if (
            cached is not None
            and _rv(cached) > _rv(body)
            and cached["metadata"].get("uid") == meta.get("uid")
        ):
            return  # our own newer write is already cached
        self.jobs[key] = copy.deepcopy(dict(body))
        self.queue.add(key)

    def _forget(self, key: JobKey) -> None:
        for cache in (self.scrapes, self.claim_modes, self.own_writes):
            cache.pop(key, None)
        self.ended_at.pop(key, None)
        self.children.forget(key)
        # Pod entries stay (views filter them by owner uid): a gone pod of the old job must stay gone.

    def pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        job = (meta.get("labels") or {}).get(builders.LABEL_JOB)
        owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "FineTuneJob"), None)
        if not job or owner is None:
            return
        key = (meta.get("namespace", ""), owner.get("name", job))
        self.children.created.get(key, {}).pop(meta.get("name", ""), None)
        entries = self.pods.setdefault(key, {})
        entry = entries.get(meta["name"])
        gone = event_type == "DELETED"
        if (
            entry is not None
            and not gone  # a DELETED (a re-list's carries the last state seen) is never stale
            and entry.body["metadata"].get("uid") == meta.get("uid")
            and _rv(entry.body) > _rv(body)
        ):
            return
        new = _PodEntry(body=copy.deepcopy(dict(body)), gone=gone, ended_at=entry.ended_at if entry else None)
        if new.ended_at is None and (gone or pods.pod_view(new.body).exit_code is not None):
            new.ended_at = time.monotonic()
        entries[meta["name"]] = new
        self.queue.add(key)

    def _informers(self, plural: str, handler: Any) -> list[Informer]:
        """One informer per watched namespace (or one for all) of the objects labelled with a job name."""
        paths = (
            [f"/api/v1/namespaces/{ns}/{plural}" for ns in self.config.namespaces]
            if self.config.namespaces
            else [f"/api/v1/{plural}"]
        )
        return [Informer(self.kube, path, handler, label_selector=builders.LABEL_JOB) for path in paths]

    # -- lifecycle of the controller --------------------------------------------------------------------
    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.config.workers)]
        informers = [*self.pod_informers, *(i for infs in self.children.informers.values() for i in infs)]
        if await self.kueue.probe():
            informers += self.kueue.informers
        self._tasks += [asyncio.create_task(inf.run()) for inf in informers]
        self._tasks.append(asyncio.create_task(self._resync()))

    async def _resync(self) -> None:
        """Re-check every unfinished job periodically: bounds anything an event alone would not wake."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for key, body in list(self.jobs.items()):
                if not JobStatus.parse(body.get("status")).finished:
                    self.queue.add(key)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.kube.close()

    async def set_leader(self, leader: bool) -> None:
        if leader:
            self.active.set()
            for key in list(self.jobs):
                self.queue.add(key)
        else:
            self.active.clear()

    async def _worker(self, index: int) -> None:
        while True:
            key = await self.queue.get()
            try:
                if not self.active.is_set():
                    await self.active.wait()
                # Never plan from a pod cache that has not listed yet (it would miss live pods).
                await asyncio.gather(*(inf.synced.wait() for inf in self.pod_informers))
                started = time.perf_counter()
                requeue = await self.reconcile(key)
                self.metrics.reconcile.observe(time.perf_counter() - started)
                if requeue is not None:
                    self.queue.add_after(key, requeue)
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.exception("reconcile %s/%s failed: %s; retrying in 5s", key[0], key[1], err)
                self.queue.add_after(key, 5.0)
            finally:
                self.queue.done(key)

    # -- reconcile ---------------------------------------------------------------------------------------
    async def reconcile(self, key: JobKey) -> float | None:
        body = self.jobs.get(key)
        if body is None:
            return None
        now = datetime.now(UTC)
        status = dict(body.get("status") or {})
        try:
            job = parse_job(body, self.config.trainer_image)
        except SpecError as err:
            await self._reject(body, status, err, now)
            return None
        seen = JobStatus.parse(status)
        finished = seen.finished and job.spec.run_policy.ttl_seconds_after_finished is None
        gone = all(e.gone for e in self.pods.get(key, {}).values())
        queue = await self.kueue.view(key, job, body)
        workload_open = queue is not None and queue.workload is not None and not queue.workload.finished
        if finished and gone and not tensorboard.involved(job, status) and not workload_open:
            return None
        views = await self._pod_views(key, job, seen)
        obs = lifecycle.Observed(
            job=job,
            status=status,
            pods=views,
            now=now,
            progress=await self._scrape(key, job, seen, views),
            missing=await observe.missing_claims(self.kube, job) if not seen.pods_created else (),
            unready_nodes=await observe.unready_nodes(
                self.kube, views, self.config.lifecycle.stuck_terminating_seconds
            ),
            tensorboard_server=self._tensorboard_server(key, job),
            existing_claim_modes=await self._existing_claim_modes(key, job),
            tensorboard_error=self.children.board_errors.get(key),
            create_error=self.children.errors.get(key),
            queue=queue,
        )
        plan = lifecycle.plan(obs, self.config.lifecycle)
        if not self.active.is_set():
            return None  # leadership was lost while observing: write and create nothing (set_leader requeues)
        # When the job we planned from is the one our own last write returned (nobody wrote since), the
        # status write and the creates go out together: a replacement pod waits for one round trip, not
        # two. Counting stays exactly-once: only the write (guarded by resourceVersion) counts. Otherwise
        # (another replica or a user wrote last) the write goes first, so a plan from a stale status that
        # loses the write creates nothing.
        if plan.create and _rv(body) == self.own_writes.get(key):
            wrote, created = await asyncio.gather(
                self._write_status(key, body, status, plan.status), self.children.create(key, plan)
            )
        else:
            wrote = await self._write_status(key, body, status, plan.status)
            created = wrote and await self.children.create(key, plan)
        if not wrote:
            return 0.5  # someone wrote first: re-plan from the newer object
        await self._apply(key, body, job, plan, created)
        if not await self.kueue.apply(
            key, job, plan.workload_create, plan.workload_patch, plan.workload_active
        ):
            return 0.5
        if plan.queued_seconds is not None and created:
            self.metrics.queued.observe(plan.queued_seconds)
        if not created:
            return 0.0  # the API refused a child: the next plan says so in the status
        if not await self.children.create_tensorboard(key, plan):
            return 0.5  # show why in the condition
        requeue = plan.requeue_after
        if JobStatus.parse(plan.status).phase == "Running" and job.spec.metrics_port:
            requeue = min(requeue or self.config.scrape_interval, self.config.scrape_interval)
        return requeue

    async def _reject(
        self, body: dict[str, Any], status: dict[str, Any], err: SpecError, now: datetime
    ) -> None:
        new = dict(status)
        if new.get("phase") != "Failed":
            set_phase(
                new, "Failed", "InvalidSpec", str(err), now, int(body["metadata"].get("generation") or 1)
            )
            new["completionTime"] = fmt_time(now)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if await self._write_status(key, body, status, new) and JobStatus.parse(status).phase != "Failed":
            await self.kube.post_event(body, "Warning", "InvalidSpec", str(err), COMPONENT)

    async def _pod_views(self, key: JobKey, job: FineTuneJob, status: JobStatus) -> list[pods.PodView]:
        entries = self.pods.setdefault(key, {})
        attempt = status.attempt
        # Forget pods of finished attempts once they are gone: nothing will ask about them again.
        for name in [n for n, e in entries.items() if e.gone and pods.pod_view(e.body).attempt < attempt]:
            del entries[name]
        if status.pods_created:
            # Pods of the live attempt that the watch has not shown: the cache may lag our own create.
            for rank in range(job.spec.workers):
                name = builders.pod_name(job.ref.name, attempt, rank)
                if name not in entries or owner_uid(entries[name].body) != job.ref.uid:
                    pod = await self.kube.get("v1", "Pod", job.ref.namespace, name)
                    if pod is not None:
                        for inf in self.pod_informers:
                            inf.remember(pod)  # so a later re-list reports it if it vanishes
                        self.pod_event("ADDED", pod)
                    elif name in self.children.created.get(key, {}):
                        # We created it, and it is gone before the watch showed it (client-go's
                        # expectations): a disruption, never a reason to create it again.
                        self.pod_event("DELETED", self.children.created[key][name])
                    else:
                        last = await observe.vanished(self.kube, self.jobs, key, job, attempt, rank)
                        if last is not None:
                            self.pod_event("DELETED", last)
        views = []
        for entry in entries.values():
            if owner_uid(entry.body) != job.ref.uid:
                continue  # a pod of an earlier job with the same name
            if _is_tensorboard_server(entry.body):
                continue
            views.append(pods.pod_view(entry.body, gone=entry.gone))
        return views

    def _tensorboard_server(self, key: JobKey, job: FineTuneJob) -> tensorboard.ServerView | None:
        """The standalone TensorBoard pod of this job, as the watch showed it last."""
        entry = self.pods.get(key, {}).get(builders.tensorboard_name(job.ref.name))
        if entry is None or owner_uid(entry.body) != job.ref.uid or not _is_tensorboard_server(entry.body):
            return None
        return tensorboard.server_view(entry.body, gone=entry.gone)

    async def _existing_claim_modes(self, key: JobKey, job: FineTuneJob) -> tuple[str, ...] | None:
        """spec.checkpoint.existingClaim's access modes, when TensorBoard is served (it decides between
        a standalone pod and a sidecar); None while the claim does not exist."""
        claim = job.spec.checkpoint.existing_claim
        if not claim or not job.spec.tensorboard.serve:
            return None
        cached = self.claim_modes.get(key)
        if cached is not None and cached[0] == claim:
            return cached[1]
        pvc = await self.kube.get("v1", "PersistentVolumeClaim", job.ref.namespace, claim)
        if pvc is None:
            return None
        modes = tuple((pvc.get("spec") or {}).get("accessModes") or ())
        self.claim_modes[key] = (claim, modes)
        return modes

    async def _scrape(
        self, key: JobKey, job: FineTuneJob, status: JobStatus, views: list[pods.PodView]
    ) -> lifecycle.Progress | None:
        """Progress from rank 0's metrics endpoint, at most once per scrape interval."""
        if not job.spec.metrics_port or status.phase not in ("Running", "Restarting", "Pending"):
            return None
        attempt = status.attempt
        rank0 = next((v for v in views if v.attempt == attempt and v.rank == 0 and not v.gone), None)
        last = self.scrapes.get(key)
        if rank0 is None or not rank0.pod_ip or rank0.phase != "Running":
            return None
        if last is not None and time.monotonic() - last.at < self.config.scrape_interval * 0.9:
            return last.progress
        url = f"http://{rank0.pod_ip}:{job.spec.metrics_port}/metrics"
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.scrape_timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            log.debug("scrape %s failed: %s", url, err)
            return last.progress if last else None
        progress = parse_trainer_metrics(text)
        if progress is None:
            return last.progress if last else None
        now = time.monotonic()
        rate = None
        if last is not None and progress.step > last.progress.step and now > last.at:
            rate = (progress.step - last.progress.step) / (now - last.at)
        rate = rate or (last.rate if last else None)
        progress = lifecycle.Progress(**{**progress.__dict__, "steps_per_second": rate})
        self.scrapes[key] = _Scrape(at=now, progress=progress, rate=rate)
        return progress

    async def _write_status(
        self, key: JobKey, body: dict[str, Any], old: Mapping[str, Any], new: Mapping[str, Any]
    ) -> bool:
        patch = status_patch(old, new)
        if patch is None:
            return True
        meta = body["metadata"]
        try:
            updated = await self.kube.patch_job_status(
                meta["namespace"], meta["name"], patch, meta.get("resourceVersion")
            )
        except ApiError as err:
            if err.status == 409:
                log.info("status of %s/%s changed underneath; re-planning", *key)
                fresh = await self.kube.get(API_VERSION, "FineTuneJob", meta["namespace"], meta["name"])
                if fresh is not None:
                    self.jobs[key] = fresh
                return False
            if err.status == 404:
                self.jobs.pop(key, None)
                return False
            raise
        self.jobs[key] = updated
        self.own_writes[key] = _rv(updated)
        return True

    async def _apply(
        self, key: JobKey, body: dict[str, Any], job: FineTuneJob, plan: lifecycle.Plan, created: bool
    ) -> None:
        """Carry out the rest of the plan once its status is written; `created`: its children were
        (when not, the attempt did not start: no recovery time, no AttemptStarted)."""
        ns = job.ref.namespace
        if plan.preempted:
            self.metrics.preemptions.labels(reason=plan.preempted).inc()
            self.metrics.lost_steps.inc(plan.lost_steps)
            # Recovery is timed from when the watch showed the attempt ending (or now, if it never did).
            self.ended_at[key] = self._attempt_end_time(key) or time.monotonic()
        if plan.started_attempt is not None and created:
            ended = self.ended_at.pop(key, None)
            if ended is not None:
                self.metrics.recovery.observe(time.monotonic() - ended)
        for name in plan.delete_pods:
            await self.kube.delete("v1", "Pod", ns, name)
        for name in plan.delete_services:
            await self.kube.delete("v1", "Service", ns, name)
        for name in plan.force_delete_pods:
            await self.kube.delete("v1", "Pod", ns, name, grace_seconds=0)
        if plan.failed:
            self.metrics.pod_failures.labels(cause=plan.failed).inc()
        current = self.jobs.get(key, body)
        for event in plan.events:
            if event.reason == "AttemptStarted" and not created:
                continue
            await self.kube.post_event(current, event.type, event.reason, event.message, COMPONENT)
        if plan.delete_job:
            await self.kube.delete(API_VERSION, "FineTuneJob", ns, job.ref.name)

    def _attempt_end_time(self, key: JobKey) -> float | None:
        entries = self.pods.get(key, {}).values()
        times = [e.ended_at for e in entries if e.ended_at is not None and not _is_tensorboard_server(e.body)]
        return max(times) if times else None


def _is_tensorboard_server(body: Mapping[str, Any]) -> bool:
    """The standalone TensorBoard pod, not a trainer pod (which may carry the serving label too)."""
    labels = body["metadata"].get("labels") or {}
    return labels.get(builders.LABEL_COMPONENT) == "tensorboard"
