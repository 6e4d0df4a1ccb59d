"""Which pod serves a job's TensorBoard, and the TensorBoardReady condition: the lifecycle's plan as data,
plus how a trainer pod with the TensorBoard sidecar is read. No cluster."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubetune_operator import lifecycle as lc
from kubetune_operator import pods, tensorboard
from kubetune_operator.api import parse_job
from kubetune_operator.status import get_condition, set_phase, status_patch

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
SETTINGS = lc.Settings(backoff_base_seconds=10, start_timeout_seconds=300)
RWO, RWX = ("ReadWriteOnce",), ("ReadWriteMany",)


def make_job(serve: bool = True, workers: int = 1, generation: int = 1, **spec: Any):
    body = {
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": generation},
        "spec": {
            "image": "img",
            "workers": workers,
            "model": {"name": "resnet50"},
            "tensorboard": {"serve": serve},
            **spec,
        },
    }
    return parse_job(body)


def trainer(attempt: int = 1, rank: int = 0, **kw: Any) -> pods.PodView:
    kw.setdefault("phase", "Running")
    kw.setdefault("created", T0)
    return pods.PodView(name=f"demo-a{attempt}-{rank}", attempt=attempt, rank=rank, **kw)


def server(**kw: Any) -> tensorboard.ServerView:
    kw.setdefault("phase", "Running")
    kw.setdefault("created", T0)
    return tensorboard.ServerView(name="demo-tensorboard", **kw)


def run(job, status, trainers=(), now=T0, **kw) -> lc.Plan:
    return lc.plan(lc.Observed(job=job, status=status, pods=list(trainers), now=now, **kw), SETTINGS)


def created(plan: lc.Plan) -> list[tuple[str, str]]:
    """What the plan creates: the job's children, then (applied last) its TensorBoard objects."""
    return [(o["kind"], o["metadata"]["name"]) for o in plan.create + plan.tensorboard_create]


def board(plan: lc.Plan) -> dict[str, Any]:
    cond = get_condition(plan.status, tensorboard.CONDITION)
    assert cond is not None, plan.status.get("conditions")
    return cond


def rank0_pod(plan: lc.Plan) -> dict[str, Any]:
    return next(o for o in plan.create if o["kind"] == "Pod" and o["metadata"]["name"].endswith("-0"))


def succeeded(job, trainers_phase: str = "Succeeded") -> lc.Plan:
    """A job whose only attempt just finished (its pod in `trainers_phase`)."""
    st = run(job, run(job, {}).status, [trainer(tensorboard=True, tensorboard_ready=True)]).status
    return run(job, st, [trainer(phase=trainers_phase, exit_code=0, tensorboard=True)])


def test_serve_false_creates_nothing_and_sets_no_condition():
    p = run(make_job(serve=False), {})
    assert created(p) == [
        ("PersistentVolumeClaim", "demo-ckpt"),
        ("ConfigMap", "demo-job"),
        ("Pod", "demo-a1-0"),
    ]
    assert "initContainers" not in rank0_pod(p)["spec"]
    assert get_condition(p.status, tensorboard.CONDITION) is None and p.delete_services == ()


def test_rwo_serves_from_a_rank0_sidecar_while_training():
    job = make_job()  # one worker: the operator's claim is ReadWriteOnce
    p = run(job, {})
    assert ("Service", "demo-tensorboard") in created(p)
    assert ("Pod", "demo-tensorboard") not in created(p)
    assert rank0_pod(p)["spec"]["initContainers"][0]["name"] == "tensorboard"
    assert (board(p)["status"], board(p)["reason"]) == ("False", "Starting")
    starting = run(job, p.status, [trainer(tensorboard=True)])
    assert board(starting)["reason"] == "SidecarNotReady" and "kubectl logs" in board(starting)["message"]
    serving = run(job, starting.status, [trainer(tensorboard=True, tensorboard_ready=True)])
    cond = board(serving)
    assert (cond["status"], cond["reason"]) == ("True", "Serving")
    assert (
        "demo-a1-0" in cond["message"]
        and "kubectl port-forward -n ml svc/demo-tensorboard 6006" in cond["message"]
    )
    assert created(serving) == [] and serving.delete_pods == ()
    again = run(job, serving.status, [trainer(tensorboard=True, tensorboard_ready=True)])
    assert status_patch(serving.status, again.status) is None  # nothing to write while it serves


def test_rwo_after_success_a_standalone_pod_serves():
    job = make_job()
    stopping = succeeded(job, trainers_phase="Running")  # the trainer exited, the sidecar is stopping
    assert stopping.status["phase"] == "Succeeded"
    assert ("Pod", "demo-tensorboard") not in created(stopping)
    assert board(stopping)["reason"] == "WaitingForTrainerPods" and "demo-ckpt" in board(stopping)["message"]
    done = [trainer(phase="Succeeded", exit_code=0, tensorboard=True)]
    p = run(job, stopping.status, done)
    assert created(p) == [
        ("PersistentVolumeClaim", "demo-ckpt"),
        ("Service", "demo-tensorboard"),
        ("Pod", "demo-tensorboard"),
    ]
    assert board(p)["reason"] == "Starting"
    serving = run(job, p.status, done, tensorboard_server=server(ready=True))
    assert (board(serving)["status"], board(serving)["reason"]) == ("True", "Serving")
    assert "pod demo-tensorboard" in board(serving)["message"] and created(serving) == []
    # Deleted by someone: recreated. Gone from the API after a failed job too.
    again = run(job, serving.status, done, tensorboard_server=server(gone=True))
    assert ("Pod", "demo-tensorboard") in created(again)
    failed = run(job, {**serving.status, "phase": "Failed"}, [trainer(gone=True)])
    assert ("Pod", "demo-tensorboard") in created(failed)


def test_rwx_serves_from_one_standalone_pod_all_along():
    job = make_job(workers=2)  # the operator's claim is ReadWriteMany
    p = run(job, {})
    assert ("Pod", "demo-tensorboard") in created(p) and ("Service", "demo-tensorboard") in created(p)
    assert all("initContainers" not in o["spec"] for o in p.create if o["kind"] == "Pod")
    names = [n for k, n in created(p)]
    assert names.index("demo-ckpt") < names.index("demo-tensorboard")  # the claim before its user
    live = [trainer(rank=0), trainer(rank=1)]
    serving = run(job, p.status, live, tensorboard_server=server(ready=True))
    assert board(serving)["reason"] == "Serving" and serving.delete_pods == ()
    # A preemption restarts the gang; the standalone pod keeps serving.
    gone = [trainer(rank=0), trainer(rank=1, gone=True, disruption=("PreemptionByScheduler", ""))]
    restart = run(job, serving.status, gone, tensorboard_server=server(ready=True))
    assert restart.status["attempt"] == 2 and "demo-tensorboard" not in restart.delete_pods
    assert board(restart)["reason"] == "Serving"


def test_existing_claim_access_modes_decide():
    rwx = make_job(checkpoint={"existingClaim": "shared"})
    p = run(rwx, {}, existing_claim_modes=("ReadWriteOnce", "ReadWriteMany"))
    assert ("Pod", "demo-tensorboard") in created(p) and "initContainers" not in rank0_pod(p)["spec"]
    assert ("PersistentVolumeClaim", "demo-ckpt") not in created(p)
    rwo = run(rwx, {}, existing_claim_modes=("ReadWriteOncePod",))
    assert ("Pod", "demo-tensorboard") not in created(rwo) and "initContainers" in rank0_pod(rwo)["spec"]


def test_missing_existing_claim_gives_a_condition_not_a_pod():
    job = make_job(checkpoint={"existingClaim": "nope"})
    missing = ("PersistentVolumeClaim 'nope' (spec.checkpoint.existingClaim) in namespace ml",)
    p = run(job, {}, missing=missing, existing_claim_modes=None)
    cond = board(p)
    assert (cond["status"], cond["reason"]) == ("False", "ClaimNotFound")
    assert "'nope'" in cond["message"] and "spec.tensorboard.serve" in cond["message"]
    assert "create it" in cond["message"]
    assert not [n for k, n in created(p) if k == "Pod"] and p.requeue_after == 10
    assert p.status["phase"] == "Pending"  # the job waits for its claim as before


def test_a_standalone_pod_that_never_gets_ready_is_given_up_then_retried():
    job = make_job(workers=2)
    st = run(job, {}).status
    live = [trainer(rank=0), trainer(rank=1)]
    problem = "Unschedulable: 0/3 nodes are available: 3 node(s) had untolerated taint"
    stuck = server(phase="Pending", problem=problem)
    early = run(job, st, live, now=T0 + timedelta(seconds=100), tensorboard_server=stuck)
    assert board(early)["reason"] == "Starting" and problem in board(early)["message"]
    assert early.requeue_after == pytest.approx(201)
    late = run(job, early.status, live, now=T0 + timedelta(seconds=301), tensorboard_server=stuck)
    cond = board(late)
    assert (cond["status"], cond["reason"]) == ("False", "ServerNotStarting")
    assert late.delete_pods == ("demo-tensorboard",) and problem in cond["message"]
    assert "'demo-ckpt'" in cond["message"] and "spec.tensorboard.serve to false" in cond["message"]
    assert late.status["phase"] == "Running"  # training goes on
    deleting = run(
        job,
        late.status,
        live,
        now=T0 + timedelta(seconds=302),
        tensorboard_server=replace(stuck, deleting=True),
    )
    assert board(deleting)["reason"] == "ServerNotStarting" and deleting.delete_pods == ()
    waiting = run(job, late.status, live, now=T0 + timedelta(seconds=400))
    assert ("Pod", "demo-tensorboard") not in created(waiting)
    assert waiting.requeue_after == pytest.approx(201)
    retry = run(job, late.status, live, now=T0 + timedelta(seconds=602))
    assert ("Pod", "demo-tensorboard") in created(retry) and board(retry)["reason"] == "Starting"
    edited = run(make_job(workers=2, generation=2), late.status, live, now=T0 + timedelta(seconds=400))
    assert ("Pod", "demo-tensorboard") in created(edited)  # a spec change retries at once


def test_tensorboard_objects_are_created_last_and_a_refusal_is_shown():
    """The API refusing the server (a namespace quota) never holds up the trainer pods; the condition
    quotes the refusal and the create is tried again after the start timeout."""
    job = make_job(workers=2)
    p = run(job, {})
    assert [o["kind"] for o in p.create] == ["PersistentVolumeClaim", "ConfigMap", "Service", "Pod", "Pod"]
    assert [(o["kind"], o["metadata"]["name"]) for o in p.tensorboard_create][-1] == (
        "Pod",
        "demo-tensorboard",
    )
    live = [trainer(rank=0), trainer(rank=1)]
    error = 'Pod demo-tensorboard: pods "demo-tensorboard" is forbidden: exceeded quota: pods=3'
    refused = run(job, p.status, live, tensorboard_error=error)
    cond = board(refused)
    assert (cond["status"], cond["reason"]) == ("False", "CreateFailed") and error in cond["message"]
    assert refused.tensorboard_create == () and refused.requeue_after == pytest.approx(300)
    assert refused.status["phase"] == "Running"
    later = run(job, refused.status, live, now=T0 + timedelta(seconds=100), tensorboard_error=error)
    assert later.tensorboard_create == () and status_patch(refused.status, later.status) is None
    retry = run(job, refused.status, live, now=T0 + timedelta(seconds=301), tensorboard_error=error)
    assert ("Pod", "demo-tensorboard") in created(retry) and ("Service", "demo-tensorboard") in created(retry)
    assert board(retry)["reason"] == "Starting"


def test_serve_false_removes_the_server_and_the_service():
    job = make_job(workers=2)
    st = run(job, {}).status
    live = [trainer(rank=0), trainer(rank=1)]
    serving = run(job, st, live, tensorboard_server=server(ready=True))
    off = run(make_job(serve=False, workers=2), serving.status, live, tensorboard_server=server(ready=True))
    assert off.delete_pods == ("demo-tensorboard",) and off.delete_services == ("demo-tensorboard",)
    assert get_condition(off.status, tensorboard.CONDITION) is None
    assert created(off) == []
    settled = run(make_job(serve=False, workers=2), off.status, live)
    assert settled.delete_pods == () and settled.delete_services == ()


def test_rwo_never_keeps_a_standalone_pod_while_training():
    job = make_job()
    st = run(job, {}).status
    p = run(job, st, [trainer(tensorboard=True)], tensorboard_server=server(ready=True))
    assert p.delete_pods == ("demo-tensorboard",)


def test_serve_turned_on_mid_attempt_says_when_it_will_serve():
    plain = make_job(serve=False)
    st = run(plain, run(plain, {}).status, [trainer()]).status
    p = run(make_job(), st, [trainer()])
    assert ("Service", "demo-tensorboard") in created(p)
    assert board(p)["reason"] == "NoSidecar" and "next attempt" in board(p)["message"]
    # The next attempt (after a preemption) gets the sidecar.
    pre = run(make_job(), p.status, [trainer(gone=True, disruption=("EvictionByEvictionAPI", ""))])
    assert pre.status["attempt"] == 2 and "initContainers" in rank0_pod(pre)["spec"]
    assert board(pre)["reason"] == "Starting" and "demo-a2-0" in board(pre)["message"]


def test_rwo_between_attempts_nothing_serves():
    job = make_job()
    st = run(job, run(job, {}).status, [trainer(tensorboard=True, tensorboard_ready=True)]).status
    failed = run(job, st, [trainer(phase="Failed", exit_code=1, tensorboard=True)])
    assert failed.status["phase"] == "Restarting" and failed.status["nextAttemptTime"]
    cond = board(failed)
    assert (cond["status"], cond["reason"]) == ("False", "NotTraining")
    assert "ReadWriteOnce" in cond["message"] and ("Pod", "demo-tensorboard") not in created(failed)


def test_phase_changes_keep_the_tensorboard_condition():
    st: dict[str, Any] = {}
    set_phase(st, "Running", "Running", "running", T0, 1)
    tensorboard_status = run(make_job(workers=2), {}).status
    st["conditions"] += [get_condition(tensorboard_status, tensorboard.CONDITION)]
    set_phase(st, "Succeeded", "Completed", "done", T0, 1)
    assert [c["type"] for c in st["conditions"]] == ["Running", "Succeeded", tensorboard.CONDITION]


# -- a trainer pod with the sidecar, as the lifecycle reads it -------------------------------------------
def pod_dict(
    trainer_state: dict[str, Any], sidecar: dict[str, Any], phase: str = "Running"
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "demo-a1-0",
            "labels": {
                "kubetune.io/attempt": "1",
                "kubetune.io/rank": "0",
                "kubetune.io/tensorboard": "true",
            },
            "creationTimestamp": "2026-11-29T11:50:00Z",
        },
        "status": {
            "phase": phase,
            "initContainerStatuses": [{"name": "tensorboard", **sidecar}],
            "containerStatuses": [{"name": "trainer", "state": trainer_state}],
        },
    }


RUNNING = {"running": {"startedAt": "2026-11-29T11:50:01Z"}}
SIDECAR_RESTARTED = {
    "ready": True,
    "restartCount": 4,
    "state": RUNNING,
    "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
}
SIDECAR_STOPPED = {"ready": False, "state": {"terminated": {"exitCode": 143, "reason": "Error"}}}
NOT_PULLED = {
    "ready": False,
    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
}
INITIALIZING = {"waiting": {"reason": "PodInitializing"}}


@pytest.mark.parametrize(
    ("trainer_state", "sidecar", "phase", "outcome", "reason"),
    [
        (RUNNING, SIDECAR_RESTARTED, "Running", pods.Outcome.RUNNING, "Running"),
        (RUNNING, SIDECAR_STOPPED, "Running", pods.Outcome.RUNNING, "Running"),
        ({"terminated": {"exitCode": 0, "reason": "Completed"}}, SIDECAR_STOPPED, "Succeeded",
         pods.Outcome.SUCCEEDED, "Completed"),
        ({"terminated": {"exitCode": 0, "reason": "Completed"}}, SIDECAR_RESTARTED, "Running",
         pods.Outcome.SUCCEEDED, "Completed"),  # the trainer is done; the sidecar is being stopped
        ({"terminated": {"exitCode": 143, "reason": "Error"}}, SIDECAR_STOPPED, "Failed",
         pods.Outcome.DISRUPTED, "SIGTERM"),
        ({"terminated": {"exitCode": 1, "reason": "Error"}}, SIDECAR_RESTARTED, "Failed",
         pods.Outcome.FAILED, "Error"),
        (INITIALIZING, NOT_PULLED, "Pending", pods.Outcome.FAILED, "ImagePull"),  # after the start timeout
    ],
)  # fmt: skip
def test_the_trainer_container_not_the_sidecar_says_how_the_pod_ended(
    trainer_state, sidecar, phase, outcome, reason
):
    view = pods.pod_view(pod_dict(trainer_state, sidecar, phase))
    assert view.tensorboard is True
    end = pods.classify(view, T0, start_timeout=300)
    assert (end.outcome, end.reason) == (outcome, reason)


def test_a_sidecar_that_cannot_pull_shows_in_the_job_status():
    view = pods.pod_view(pod_dict(INITIALIZING, NOT_PULLED, "Pending"))
    assert (view.waiting_reason, view.waiting_message) == ("ImagePullBackOff", "no such image")
    assert view.tensorboard_ready is False
    assert pods.pod_view(pod_dict(RUNNING, SIDECAR_RESTARTED)).tensorboard_ready is True


def test_server_view_reads_why_the_pod_is_not_running():
    pod = {
        "metadata": {"name": "demo-tensorboard", "uid": "x", "creationTimestamp": "2026-11-29T12:00:00Z"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"}
            ],
        },
    }
    view = tensorboard.server_view(pod)
    assert (view.phase, view.ready, view.problem, view.created) == (
        "Pending",
        False,
        "Unschedulable: 0/3 nodes",
        T0,
    )
    pod["status"] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "tensorboard", "state": RUNNING}],
    }
    assert tensorboard.server_view(pod).ready and tensorboard.server_view(pod).problem == ""
