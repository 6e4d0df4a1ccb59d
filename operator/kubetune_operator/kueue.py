"""Kueue's Workload API as kubetune uses it (the external-framework protocol), as pure functions.

A FineTuneJob labelled `kueue.x-k8s.io/queue-name` is represented to Kueue by one Workload that the
operator creates (one pod set of `workers` pods: the gang is admitted whole or not at all) and owns.
Kueue reserves quota and admits it; the operator starts pods only while it is admitted, applies the
admitted flavors' node labels and tolerations, and on eviction stops the pods gracefully (they
checkpoint on SIGTERM) before clearing the admission, as Kueue's own job reconciler does
(pkg/controller/jobframework/reconciler.go, "handle eviction"). Nothing here talks to the API.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubetune_operator import builders
from kubetune_operator.api import FineTuneJob
from kubetune_operator.status import set_condition

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
QUEUE_LABEL = f"{GROUP}/queue-name"
PRIORITY_LABEL = f"{GROUP}/priority-class"
POD_SET = "trainer"
# The PodsReady condition as Kueue's job reconciler writes it (jobframework/reconciler.go,
# generatePodsReadyCondition): with `waitForPodsReady` on, Kueue evicts a Workload whose pods are not all
# Ready within its timeout, so a framework that never sets it is evicted on every admission.
PODS_READY = "PodsReady"
_NOT_READY = "Not all pods are ready or succeeded"
_RECOVERING = "At least one pod has failed, waiting for recovery"
_READY = "All pods reached readiness and the workload is running"
# Evicted reasons after which Kueue's own integrations set Requeued=True (reconciler.go).
_REQUEUED_REASONS = ("Preempted", "NodeFailures")


def queue_name(body: Mapping[str, Any]) -> str | None:
    """The LocalQueue a FineTuneJob object asks for (its `kueue.x-k8s.io/queue-name` label)."""
    labels = (body.get("metadata") or {}).get("labels") or {}
    value = labels.get(QUEUE_LABEL)
    return str(value) if value else None


def priority_class(body: Mapping[str, Any]) -> str | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    value = labels.get(PRIORITY_LABEL)
    return str(value) if value else None


def workload_name(job: FineTuneJob) -> str:
    """Deterministic per job object: a re-created job of the same name gets a new Workload."""
    return builders._fit(f"finetunejob-{job.ref.name}", f"-{job.ref.uid[:5]}", limit=253)


@dataclass(frozen=True)
class Flavor:
    """What an admitted ResourceFlavor puts on the pods (spec.nodeLabels, spec.tolerations)."""

    node_labels: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


def flavor(body: Mapping[str, Any]) -> Flavor:
    spec = body.get("spec") or {}
    return Flavor(
        node_labels=dict(spec.get("nodeLabels") or {}),
        tolerations=tuple(dict(t) for t in spec.get("tolerations") or []),
    )


@dataclass(frozen=True)
class PodSetUpdate:
    """What an admission check asks for on the pods (status.admissionChecks[].podSetUpdates)."""

    check: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Placement:
    """What every pod of an admitted attempt gets, merged as Kueue's podset.Merge does: the flavors'
    node labels and tolerations, then each admission check's update; a key set to two values is a
    conflict (`error`), and the job does not start."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Condition:
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class WorkloadView:
    name: str
    resource_version: str
    generation: int
    conditions: Mapping[str, Condition]
    raw_conditions: tuple[Mapping[str, Any], ...]
    cluster_queue: str | None
    flavors: tuple[str, ...]  # the admitted pod set's flavor names (every resource's)
    owner_uid: str | None
    active: bool = True
    pod_set_updates: tuple[
        PodSetUpdate, ...
    ] = ()  # the admission checks' updates of our pod set  # spec.active: False deactivates it (Kueue evicts it and admits it no more)

    def has(self, kind: str) -> bool:
        c = self.conditions.get(kind)
        return c is not None and c.status

    @property
    def admitted(self) -> bool:
        return self.has("Admitted") and self.cluster_queue is not None

    @property
    def quota_reserved(self) -> bool:
        return self.has("QuotaReserved")

    @property
    def evicted(self) -> Condition | None:
        c = self.conditions.get("Evicted")
        return c if c is not None and c.status else None

    @property
    def finished(self) -> bool:
        return self.has("Finished")

    @property
    def waiting(self) -> Condition:
        """Why Kueue has not admitted it (its QuotaReserved condition: Pending, Inadmissible ...)."""
        c = self.conditions.get("QuotaReserved")
        if c is None or c.status:
            return Condition(False, "Pending", "the Workload is waiting for Kueue to reserve quota")
        return c


def workload_view(body: Mapping[str, Any]) -> WorkloadView:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    raw = tuple(dict(c) for c in status.get("conditions") or [])
    conds = {
        str(c.get("type")): Condition(
            c.get("status") == "True", str(c.get("reason") or ""), str(c.get("message") or "")
        )
        for c in raw
    }
    admission = status.get("admission") or {}
    flavors: list[str] = []
    for psa in admission.get("podSetAssignments") or []:
        flavors += [str(f) for f in (psa.get("flavors") or {}).values() if str(f) not in flavors]
    owner = next((o for o in meta.get("ownerReferences") or [] if o.get("kind") == "FineTuneJob"), None)
    updates = [
        PodSetUpdate(
            check=str(check.get("name") or ""),
            labels=dict(u.get("labels") or {}),
            annotations=dict(u.get("annotations") or {}),
            node_selector=dict(u.get("nodeSelector") or {}),
            tolerations=tuple(dict(t) for t in u.get("tolerations") or []),
        )
        for check in status.get("admissionChecks") or []
        for u in check.get("podSetUpdates") or []
        if u.get("name") == POD_SET
    ]
    return WorkloadView(
        name=str(meta.get("name") or ""),
        resource_version=str(meta.get("resourceVersion") or ""),
        generation=int(meta.get("generation") or 1),
        conditions=conds,
        raw_conditions=raw,
        cluster_queue=str(admission["clusterQueue"]) if admission.get("clusterQueue") else None,
        flavors=tuple(flavors),
        owner_uid=owner.get("uid") if owner else None,
        active=(body.get("spec") or {}).get("active", True) is not False,
        pod_set_updates=tuple(updates),
    )


@dataclass(frozen=True)
class QueueView:
    """The queueing side of one labelled job, as the controller observed it."""

    local_queue: str
    workload: WorkloadView | None
    priority_class: str | None = None
    priority: int | None = None  # the WorkloadPriorityClass's value
    flavors: Mapping[str, Flavor] = field(default_factory=dict)  # the admitted ones, by name
    error: str | None = None  # e.g. the priority class does not exist


def build_workload(job: FineTuneJob, queue: QueueView) -> dict[str, Any]:
    """The Workload for `job`: one pod set, the trainer pod's template, `workers` pods."""
    pod = builders.trainer_pod(job, 1, 0)
    template = {
        "metadata": {"labels": dict(pod["metadata"].get("labels") or {})},
        "spec": copy.deepcopy(pod["spec"]),
    }
    spec: dict[str, Any] = {
        "queueName": queue.local_queue,
        "podSets": [{"name": POD_SET, "count": job.spec.workers, "template": template}],
    }
    if queue.priority_class:
        spec["priorityClassRef"] = {
            "group": GROUP,
            "kind": "WorkloadPriorityClass",
            "name": queue.priority_class,
        }
        if queue.priority is not None:
            spec["priority"] = queue.priority
    return {
        "apiVersion": API_VERSION,
        "kind": "Workload",
        "metadata": {
            "name": workload_name(job),
            "namespace": job.ref.namespace,
            "labels": {**builders.MANAGED_BY, builders.LABEL_JOB: builders.job_label(job.ref.name)},
            "ownerReferences": [builders.owner_reference(job.ref)],
        },
        "spec": spec,
    }


def _merge(into: dict[str, str], new: Mapping[str, str], what: str, check: str) -> str | None:
    for key, value in new.items():
        if key in into and into[key] != value:
            return (
                f"admission check {check!r} sets {what} {key}={value!r}, which is already {into[key]!r}: "
                "the pods cannot have both (fix the check's podSetUpdates or the flavor)"
            )
        into[key] = value
    return None


def placement(queue: QueueView) -> Placement:
    """The admitted flavors' node labels and tolerations, then the admission checks' podSetUpdates."""
    node_selector: dict[str, str] = {}
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    tolerations: list[dict[str, Any]] = []
    wl = queue.workload
    for name in wl.flavors if wl else ():
        f = queue.flavors.get(name)
        if f is None:
            continue
        node_selector.update(f.node_labels)
        tolerations += [dict(t) for t in f.tolerations if dict(t) not in tolerations]
    error = None
    for u in wl.pod_set_updates if wl else ():
        error = (
            _merge(annotations, u.annotations, "annotation", u.check)
            or _merge(labels, u.labels, "label", u.check)
            or _merge(node_selector, u.node_selector, "nodeSelector", u.check)
            or error
        )
        tolerations += [dict(t) for t in u.tolerations if dict(t) not in tolerations]
    return Placement(node_selector, tuple(tolerations), labels, annotations, error)


def apply_placement(pod: dict[str, Any], where: Placement) -> None:
    spec, meta = pod["spec"], pod["metadata"]
    if where.node_selector:
        spec["nodeSelector"] = {**(spec.get("nodeSelector") or {}), **where.node_selector}
    if where.tolerations:
        have = list(spec.get("tolerations") or [])
        spec["tolerations"] = have + [dict(t) for t in where.tolerations if dict(t) not in have]
    if where.labels:  # the operator's own labels (job, attempt, rank) win: it finds its pods by them
        meta["labels"] = {**where.labels, **(meta.get("labels") or {})}
    if where.annotations:
        meta["annotations"] = {**where.annotations, **(meta.get("annotations") or {})}


def unadmit_patch(wl: WorkloadView, now: datetime) -> dict[str, Any]:
    """The status merge patch that hands the quota back once the evicted pods are gone: admission
    cleared, QuotaReserved and Admitted False, Requeued as Kueue's integrations set it."""
    ev = wl.evicted or Condition(True, "Evicted", "")
    st: dict[str, Any] = {"conditions": [dict(c) for c in wl.raw_conditions]}
    gen = wl.generation
    set_condition(st, "Requeued", ev.reason in _REQUEUED_REASONS, ev.reason, ev.message, now, gen)
    set_condition(st, "QuotaReserved", False, "Pending", ev.message, now, gen)
    set_condition(st, "Admitted", False, "NoReservation", "The workload has no reservation", now, gen)
    if PODS_READY in wl.conditions:  # the next admission's timeout counts from its start again
        set_condition(st, PODS_READY, False, "WaitForStart", _NOT_READY, now, gen)
    return {"admission": None, "conditions": st["conditions"]}


def pods_ready(wl: WorkloadView, ready: bool) -> Condition:
    """The PodsReady condition an admitted Workload should carry, given whether every pod of the running
    attempt is Ready (or Succeeded): Started/Recovered when they are; WaitForStart before they first were,
    WaitForRecovery once they had been (Kueue's recoveryTimeout then counts)."""
    cur = wl.conditions.get(PODS_READY)
    if ready:
        recovered = cur is not None and cur.reason in ("WaitForRecovery", "Recovered")
        return Condition(True, "Recovered" if recovered else "Started", _READY)
    if cur is not None and (cur.status or cur.reason == "WaitForRecovery"):
        return Condition(False, "WaitForRecovery", _RECOVERING)
    return Condition(False, "WaitForStart", _NOT_READY)


def pods_ready_patch(wl: WorkloadView, ready: bool, now: datetime) -> dict[str, Any] | None:
    """The status merge patch that brings PodsReady up to date, or None when it already says so (a
    missing condition reads as WaitForStart, as Kueue reads it)."""
    want = pods_ready(wl, ready)
    cur = wl.conditions.get(PODS_READY) or Condition(False, "WaitForStart", _NOT_READY)
    if (cur.status, cur.reason) == (want.status, want.reason):
        return None
    st: dict[str, Any] = {"conditions": [dict(c) for c in wl.raw_conditions]}
    set_condition(st, PODS_READY, want.status, want.reason, want.message, now, wl.generation)
    return {"conditions": st["conditions"]}


def finish_patch(wl: WorkloadView, succeeded: bool, message: str, now: datetime) -> dict[str, Any]:
    """Finished=True: Kueue releases the quota at once."""
    st: dict[str, Any] = {"conditions": [dict(c) for c in wl.raw_conditions]}
    reason = "Succeeded" if succeeded else "Failed"
    set_condition(st, "Finished", True, reason, message or reason, now, wl.generation)
    return {"conditions": st["conditions"]}


def eviction_reason(ev: Condition | None) -> str:
    """The `status.preemptionsByReason` key of a Kueue eviction (or a vanished Workload)."""
    return "KueuePreempted" if ev is not None and ev.reason == "Preempted" else "KueueEvicted"
