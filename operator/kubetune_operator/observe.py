"""What a reconcile reads from the API beyond the watch caches: the claims a job still waits for, the
nodes its stuck pods are on, and what the Events say of a pod that went while the operator was down."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kubetune_operator import builders, pods
from kubetune_operator.api import FineTuneJob, JobKey
from kubetune_operator.kube import ApiError, Kube
from kubetune_operator.status import parse_time

log = logging.getLogger(__name__)

# Event reasons that say why a pod went, as the DisruptionTarget condition would have (read when the pod
# itself is gone): the scheduler's preemption, the taint manager, the kubelet's node-pressure eviction.
_EVENT_CAUSES = {
    "Preempted": "PreemptionByScheduler",
    "TaintManagerEviction": "DeletionByTaintManager",
    "Evicted": "TerminationByKubelet",
}


async def vanished(
    kube: Kube,
    jobs: Mapping[JobKey, Mapping[str, Any]],
    key: JobKey,
    job: FineTuneJob,
    attempt: int,
    rank: int,
) -> dict[str, Any] | None:
    """A pod of the live attempt that no watch event, GET or create of this process knows (it went
    while the operator was down). Its Events say whether it existed (the scheduler records every
    binding or failure to bind) and, where they can, why it went. With none, it never existed: None,
    and the lifecycle creates it without counting anything. `jobs` is the controller's job cache (the
    job's creationTimestamp: Events before it are an earlier job's)."""
    name = builders.pod_name(job.ref.name, attempt, rank)
    params = {"fieldSelector": f"involvedObject.kind=Pod,involvedObject.name={name}"}
    try:
        doc = await kube.request("GET", f"/api/v1/namespaces/{job.ref.namespace}/events", params=params)
    except ApiError as err:
        log.warning("%s/%s: cannot read the Events of pod %s: %s", *key, name, err)
        return None
    born = parse_time(((jobs.get(key) or {}).get("metadata") or {}).get("creationTimestamp"))
    items = [e for e in doc.get("items") or [] if born is None or (_event_time(e) or born) >= born]
    if not items:
        return None
    pod = builders.trainer_pod(job, attempt, rank)
    cause = next(
        (
            (_EVENT_CAUSES[e.get("reason", "")], str(e.get("message") or ""))
            for e in items
            if e.get("reason") in _EVENT_CAUSES
        ),
        None,
    )
    if cause is not None:
        condition = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": cause[0],
            "message": cause[1],
        }
        pod["status"] = {"conditions": [condition]}
    log.info(
        "%s/%s: pod %s went while the operator was down (%s)",
        *key,
        name,
        cause[0] if cause else "no cause recorded",
    )
    return pod


def _event_time(event: Mapping[str, Any]) -> datetime | None:
    return parse_time(
        event.get("eventTime")
        or event.get("lastTimestamp")
        or event.get("firstTimestamp")
        or (event.get("metadata") or {}).get("creationTimestamp")
    )


async def missing_claims(kube: Kube, job: FineTuneJob) -> tuple[str, ...]:
    """Claims the user must create before pods can start (a waiting condition, not a crash).

    A missing W&B Secret is reported from the pod's CreateContainerConfigError instead, so the
    operator needs no permission to read Secrets."""
    missing = []
    ns = job.ref.namespace
    if job.spec.data_claim and await kube.get("v1", "PersistentVolumeClaim", ns, job.spec.data_claim) is None:
        missing.append(
            f"PersistentVolumeClaim {job.spec.data_claim!r} (spec.data.claimName) in namespace {ns}"
        )
    if job.spec.checkpoint.existing_claim:
        claim = job.spec.checkpoint.existing_claim
        if await kube.get("v1", "PersistentVolumeClaim", ns, claim) is None:
            missing.append(
                f"PersistentVolumeClaim {claim!r} (spec.checkpoint.existingClaim) in namespace {ns}"
            )
    return tuple(missing)


async def unready_nodes(kube: Kube, views: Sequence[pods.PodView], stuck_after: float) -> frozenset[str]:
    """The nodes NotReady or gone among those of pods Terminating for `stuck_after` seconds or more."""
    now = datetime.now(UTC)
    nodes = {
        v.node_name
        for v in views
        if v.node_name
        and not v.gone
        and v.deleting_since
        and (now - v.deleting_since).total_seconds() >= stuck_after
    }
    unready = set()
    for name in nodes:
        try:
            node = await kube.request("GET", f"/api/v1/nodes/{name}")
        except ApiError as err:
            if err.status == 404:
                unready.add(name)
                continue
            raise
        ready: dict[str, Any] = next(
            (c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"),
            {},
        )
        if ready.get("status") != "True":
            unready.add(name)
    return frozenset(unready)
