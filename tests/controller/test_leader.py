"""Leader election against the real API server with two operator replicas: a frozen leader (SIGSTOP)
is replaced only once the Lease has expired by the follower's clock and, thawed, no longer acts; a
leader stopped cleanly (SIGTERM) releases the Lease, so the follower takes over at once."""

from __future__ import annotations

import re
import signal
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubeutil import NotYet, wait_for
from opkit import OperatorProcess, apply, job_manifest

pytestmark = pytest.mark.cluster

LEASE_NAME = "kubetune-operator"  # cli.py's --leader-name default
LEASE, RENEW, RETRY = 8, 5, 1
FAST = (
    "--lease-seconds",
    str(LEASE),
    "--renew-deadline-seconds",
    str(RENEW),
    "--retry-period-seconds",
    str(RETRY),
)


@pytest.fixture
def leases(api_client: Any) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(api_client)


def lease_record(leases: client.CoordinationV1Api, ns: str) -> tuple[str, str, int] | None:
    """(holder, renewTime, leaseTransitions) of the operator's Lease; None while it does not exist."""
    try:
        spec = leases.read_namespaced_lease(LEASE_NAME, ns).spec
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return (spec.holder_identity or "", str(spec.renew_time), int(spec.lease_transitions or 0))


def wait_holder(leases, ns: str, op: OperatorProcess, timeout: float = 30.0) -> None:
    def held() -> Any:
        rec = lease_record(leases, ns)
        return (rec is not None and rec[0] == op.identity) or NotYet(rec)

    wait_for(held, timeout=timeout, desc=f"Lease held by {op.identity}")


def job_status(custom: client.CustomObjectsApi, ns: str) -> dict[str, Any]:
    return (
        custom.get_namespaced_custom_object("kubetune.io", "v1alpha1", ns, "finetunejobs", "ft").get("status")
        or {}
    )


def wait_attempt(custom: client.CustomObjectsApi, ns: str, attempt: int) -> dict[str, Any]:
    def running() -> Any:
        st = job_status(custom, ns)
        return st if st.get("attempt") == attempt and st.get("phase") == "Running" else NotYet(st)

    return wait_for(running, timeout=40, desc=f"{ns}/ft attempt {attempt} Running")


def pod_names(core: Any, ns: str) -> list[str]:
    return sorted(p.metadata.name for p in core.list_namespaced_pod(ns).items)


def reconciles(op: OperatorProcess) -> int:
    match = re.search(r"^kubetune_reconcile_seconds_count (\S+)$", op.metrics(), re.M)
    return int(float(match.group(1))) if match else 0


def test_frozen_leader_is_replaced_after_expiry_and_stays_out(
    kube, start_operator, custom, core_v1, leases, namespace
):
    first = start_operator(*FAST)
    wait_holder(leases, namespace, first)
    second = start_operator(*FAST)
    apply(kube, namespace, job_manifest("ft"))
    wait_attempt(custom, namespace, 1)
    # Freeze the leader right after a renew the test saw, and time from the last change seen after it.
    before = lease_record(leases, namespace)
    wait_for(lambda: lease_record(leases, namespace) != before, timeout=10, interval=0.05, desc="a renew")
    reconciled = reconciles(first)
    first.signal(signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        last: dict[str, Any] = {"record": lease_record(leases, namespace), "at": frozen_at}

        def taken_over() -> Any:
            rec = lease_record(leases, namespace)
            now = time.monotonic()
            if rec is not None and rec[0] == second.identity:
                return now
            if rec != last["record"]:  # a renew that was in flight at the freeze
                last.update(record=rec, at=now)
            return NotYet(rec)

        took_at = wait_for(taken_over, timeout=LEASE + 15, interval=0.05, desc="the follower takes over")
        takeover = took_at - last["at"]
        print(
            f"takeover {takeover:.2f}s after the last Lease change seen, {took_at - frozen_at:.2f}s after SIGSTOP"
        )
        # Not before the lease duration has passed since the last change (the follower saw that change when
        # the test did or later), and about one retry period after it expired.
        assert LEASE - 0.3 <= takeover <= LEASE + RETRY + 3
        # The new leader acts while the old one is frozen.
        core_v1.delete_namespaced_pod("ft-a1-0", namespace, grace_period_seconds=0)
        wait_attempt(custom, namespace, 2)
    finally:
        first.signal(signal.SIGCONT)
    thawed_at = time.monotonic()
    wait_for(
        lambda: "lost leadership" in first.log_text(), timeout=10, interval=0.05, desc="old leader steps down"
    )
    print(f"the old leader stepped down {time.monotonic() - thawed_at:.2f}s after SIGCONT")
    # More work for a leader, seen by both replicas' watches: only the new leader may do it.
    core_v1.delete_namespaced_pod("ft-a2-0", namespace, grace_period_seconds=0)
    wait_attempt(custom, namespace, 3)
    wait_for(lambda: first.probes().get("leader") is False, timeout=15, desc="old leader's probe: not leader")
    assert reconciles(first) == reconciled, "the thawed old leader reconciled"
    assert "kubetune_preemptions_total{" not in first.metrics()
    assert "kubetune_preemptions_total{" in second.metrics()
    assert job_status(custom, namespace)["preemptions"] == 2
    assert pod_names(core_v1, namespace) == ["ft-a3-0"]
    assert lease_record(leases, namespace)[0] == second.identity  # it did not take the Lease back


def test_sigterm_releases_the_lease_and_the_follower_takes_over_at_once(
    kube, start_operator, custom, core_v1, leases, namespace
):
    first = start_operator()  # default durations: a 15 s lease
    wait_holder(leases, namespace, first)
    second = start_operator()
    apply(kube, namespace, job_manifest("ft"))
    wait_attempt(custom, namespace, 1)
    first.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    wait_holder(leases, namespace, second, timeout=15)
    takeover = time.monotonic() - stopped_at
    print(f"takeover {takeover:.2f}s after SIGTERM")
    assert takeover < 5, "the Lease was not released"
    assert first.proc is not None and first.proc.wait(timeout=15) == 0
    assert "released" in first.log_text()
    core_v1.delete_namespaced_pod("ft-a1-0", namespace, grace_period_seconds=0)
    wait_attempt(custom, namespace, 2)
