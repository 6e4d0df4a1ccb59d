"""Creating a job's children, and what the next reconcile must know of those creates.

Deterministic names make AlreadyExists a success, except where the name is taken by an object of another
owner. Kept per job for the next plan: the API's refusal of a child (`errors`, `board_errors`) and the
pods this process created that no watch event has shown yet (`created`: client-go's expectations).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from kubetune_operator.api import JobKey
from kubetune_operator.informer import Informer
from kubetune_operator.kube import ApiError, Kube
from kubetune_operator.lifecycle import CreateError, Plan
from kubetune_operator.status import JobStatus

log = logging.getLogger(__name__)

# The kinds of attempt children that outlive pods, watched by informers (see `Children.informers`).
CHILD_PLURALS = {
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "ConfigMap": "configmaps",
    "Service": "services",
}


def owner_uid(body: Mapping[str, Any]) -> str | None:
    owner: dict[str, Any] = next(iter(body["metadata"].get("ownerReferences") or []), {})
    return owner.get("uid")


class Children:
    """Creates a job's children and keeps, per job, what the next reconcile must know of those creates."""

    def __init__(
        self,
        kube: Kube,
        informers: Mapping[str, Sequence[Informer]],
        pods: Mapping[JobKey, Mapping[str, object]],
    ) -> None:
        self.kube = kube
        # The attempt children that outlive pods (kind -> informers), cached so a replacement skips the
        # create round trips of what already exists (only the status write and the pod create are on the
        # recovery path).
        self.informers = informers
        self._pods = pods  # the controller's pod cache: a pod it shows needs no expectation
        # The API's refusal of a child of the current attempt, until a create of that attempt succeeds.
        self.errors: dict[JobKey, CreateError] = {}
        # Why the last TensorBoard create failed, shown in the next reconcile's TensorBoardReady condition.
        self.board_errors: dict[JobKey, str] = {}
        # Pods this process created that no watch event has shown yet (name -> the object sent).
        self.created: dict[JobKey, dict[str, dict[str, Any]]] = {}

    def forget(self, key: JobKey) -> None:
        for cache in (self.errors, self.board_errors, self.created):
            cache.pop(key, None)

    def _cached(self, obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """The cached copy of a PVC, ConfigMap or Service the plan wants, when a synced informer has it."""
        meta = obj["metadata"]
        for inf in self.informers.get(obj["kind"], []):
            if inf.synced.is_set():
                found = inf.store.get(f"{meta.get('namespace', '')}/{meta['name']}")
                if found is not None:
                    return found
        return None

    async def create(self, key: JobKey, plan: Plan) -> bool:
        """Create the attempt's children in order; False when the API refused one (kept for the next plan).

        The trainer ConfigMap is replaced when it exists, so each attempt runs with the spec as it is when
        the attempt starts (mutable fields included); but only when it is this job's own. A name taken by
        an object of another owner (an earlier job's pod still Terminating, a user's ConfigMap) is a
        refusal with a retry, never a silent success or an overwrite."""
        attempt = JobStatus.parse(plan.status).attempt
        for obj in plan.create:
            meta = obj["metadata"]
            try:
                await self._create_one(key, obj)
            except (ApiError, aiohttp.ClientError, TimeoutError) as err:
                status = err.status if isinstance(err, ApiError) else 0
                message = err.message if isinstance(err, ApiError) else str(err) or type(err).__name__
                prev = self.errors.get(key)
                retries = prev.retries + 1 if prev is not None and prev.attempt == attempt else 0
                self.errors[key] = CreateError(attempt, obj["kind"], meta["name"], status, message, retries)
                log.warning("%s/%s: could not create %s %s: %s", *key, obj["kind"], meta["name"], message)
                return False
        if plan.started_attempt is not None:
            self.errors.pop(key, None)
        return True

    async def _create_one(self, key: JobKey, obj: dict[str, Any]) -> None:
        kind, meta = obj["kind"], obj["metadata"]
        cached = self._cached(obj)
        if cached is not None and (kind != "ConfigMap" or cached.get("data") == obj.get("data")):
            return  # exists as wanted
        if cached is None and await self.kube.create(obj):
            if kind == "Pod" and meta["name"] not in self._pods.get(key, {}):
                self.created.setdefault(key, {})[meta["name"]] = obj  # until a watch event shows it
            return
        if kind not in ("Pod", "ConfigMap"):
            return  # the claim or Service exists: deterministic names make that a success
        # A fresh read (not the cache): its resourceVersion guards the replace below.
        current = await self.kube.get("v1", kind, meta["namespace"], meta["name"])
        if current is None:
            raise ApiError(
                409, "Conflict", f"{kind} {meta['name']} was deleted while being created; retrying"
            )
        want = owner_uid(obj)
        if owner_uid(current) != want:
            what = "an earlier FineTuneJob's pod of the same name is still there (Terminating)"
            if kind == "ConfigMap":
                what = "a ConfigMap of that name exists and is not this job's; kubetune will not overwrite it"
            raise ApiError(409, "AlreadyExists", f"{what}: delete it or rename the job")
        if kind == "ConfigMap":
            rv = (current.get("metadata") or {}).get("resourceVersion")
            await self.kube.replace({**obj, "metadata": {**meta, "resourceVersion": rv}})

    async def create_tensorboard(self, key: JobKey, plan: Plan) -> bool:
        """Create the TensorBoard objects; False when the API refused one (a quota, a LimitRange): that is
        remembered for the condition, and never keeps the trainer's lifecycle from going on."""
        for obj in plan.tensorboard_create:
            try:
                await self.kube.create(obj)
            except ApiError as err:
                what = f"{obj['kind']} {obj['metadata']['name']}: {err.message}"
                log.warning("%s/%s: could not create %s", *key, what)
                self.board_errors[key] = what
                return False
        if plan.tensorboard_create:
            self.board_errors.pop(key, None)
        return True
