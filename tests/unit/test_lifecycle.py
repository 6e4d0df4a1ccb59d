"""The lifecycle as data: how pods ended (table) and what the job does next (scenarios)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from kubetune_operator import lifecycle as lc
from kubetune_operator import pods
from kubetune_operator.api import parse_job
from kubetune_operator.status import get_condition, status_patch

pytestmark = pytest.mark.unit

T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
SETTINGS = lc.Settings(backoff_base_seconds=10, backoff_max_seconds=300, start_timeout_seconds=300)


def report(reason: str, step: int = 0, ckpt: int = 0, message: str = "") -> pods.TrainerReport:
    return pods.TrainerReport(
        reason=reason, step=step, checkpoint_step=ckpt, message=message, total_steps=100
    )


def pod(attempt: int = 1, rank: int = 0, **kw) -> pods.PodView:
    kw.setdefault("phase", "Running")
    kw.setdefault("created", T0)
    return pods.PodView(name=f"demo-a{attempt}-{rank}", attempt=attempt, rank=rank, **kw)


PREEMPTED = ("PreemptionByScheduler", "preempted by ml/high")
OLD = T0 - timedelta(seconds=301)


@pytest.mark.parametrize(
    ("view", "outcome", "reason"),
    [
        (pod(gone=True), pods.Outcome.DISRUPTED, "PodDeleted"),
        (pod(gone=True, disruption=PREEMPTED), pods.Outcome.DISRUPTED, "PreemptionByScheduler"),
        (
            pod(gone=True, disruption=("DeletionByPodGC", "node gone")),
            pods.Outcome.DISRUPTED,
            "DeletionByPodGC",
        ),
        (pod(phase="Succeeded", exit_code=0), pods.Outcome.SUCCEEDED, "Completed"),
        (pod(phase="Failed", exit_code=2), pods.Outcome.PERMANENT, "InvalidConfig"),
        (
            pod(phase="Failed", exit_code=1, report=report("InvalidConfig")),
            pods.Outcome.PERMANENT,
            "InvalidConfig",
        ),
        (pod(phase="Failed", exit_code=143, report=report("Preempted")), pods.Outcome.DISRUPTED, "SIGTERM"),
        (pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled"), pods.Outcome.FAILED, "OOMKilled"),
        (pod(phase="Failed", exit_code=1, report=report("Error")), pods.Outcome.FAILED, "Error"),
        (pod(phase="Failed", exit_code=137, deleting_since=T0), pods.Outcome.DISRUPTED, "PodDeleted"),
        (pod(phase="Failed", exit_code=143, deleting_since=T0), pods.Outcome.DISRUPTED, "PodDeleted"),
        (pod(phase="Failed", exit_code=137, terminated_reason="Error"), pods.Outcome.DISRUPTED, "SIGKILL"),
        (pod(phase="Failed", exit_code=139, terminated_reason="Error"), pods.Outcome.FAILED, "Error"),
        (
            pod(phase="Failed", exit_code=137, disruption=PREEMPTED),
            pods.Outcome.DISRUPTED,
            "PreemptionByScheduler",
        ),
        (
            pod(phase="Failed", exit_code=143, disruption=("EvictionByEvictionAPI", "")),
            pods.Outcome.DISRUPTED,
            "EvictionByEvictionAPI",
        ),
        (pod(phase="Failed", status_reason="Evicted"), pods.Outcome.DISRUPTED, "Evicted"),
        (pod(phase="Failed", status_reason="Terminated"), pods.Outcome.DISRUPTED, "Terminated"),
        (pod(disruption=PREEMPTED), pods.Outcome.TERMINATING, "PreemptionByScheduler"),
        (pod(deleting_since=T0), pods.Outcome.TERMINATING, "PodDeleted"),
        (pod(phase="Pending", waiting_reason="ImagePullBackOff"), pods.Outcome.PENDING, "ImagePullBackOff"),
        (
            pod(phase="Pending", waiting_reason="ImagePullBackOff", created=OLD),
            pods.Outcome.FAILED,
            "ImagePull",
        ),
        (
            pod(phase="Pending", waiting_reason="CreateContainerConfigError", created=OLD),
            pods.Outcome.FAILED,
            "ContainerConfig",
        ),
        (pod(phase="Running"), pods.Outcome.RUNNING, "Running"),
        (pod(phase="Pending"), pods.Outcome.PENDING, "Pending"),
    ],
)
def test_classify(view, outcome, reason):
    end = pods.classify(view, T0, start_timeout=300)
    assert (end.outcome, end.reason) == (outcome, reason)


def test_parse_report_takes_last_json_line():
    text = 'some log\n{"reason": "Preempted", "step": 40, "checkpointStep": 40, "totalSteps": 100, "checkpoint": "/c/s40"}\n'
    r = pods.parse_report(text)
    assert r is not None and (r.reason, r.step, r.checkpoint_step, r.checkpoint) == (
        "Preempted",
        40,
        40,
        "/c/s40",
    )
    assert pods.parse_report("Traceback: boom") is None
    assert pods.parse_report(None) is None


def make_job(workers: int = 1, **policy):
    body = {
        "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": 1},
        "spec": {
            "image": "img",
            "workers": workers,
            "model": {"name": "resnet50"},
            "training": {"maxSteps": 100},
            "runPolicy": policy,
        },
    }
    return parse_job(body)


def run(job, status, pods, now=T0, **kw):
    return lc.plan(lc.Observed(job=job, status=status, pods=pods, now=now, **kw), SETTINGS)


def pods_created(plan):
    return [o["metadata"]["name"] for o in plan.create if o["kind"] == "Pod"]


def started(job):
    """Status after attempt 1's pods were created and seen running."""
    p1 = run(job, {}, [])
    p2 = run(job, p1.status, [pod()])
    return p2.status


def test_new_job_creates_children_then_runs():
    job = make_job()
    p = run(job, {}, [])
    assert [o["kind"] for o in p.create] == ["PersistentVolumeClaim", "ConfigMap", "Pod"]
    assert pods_created(p) == ["demo-a1-0"]
    # The write before the create records it: attempt 1's pods are never created a second time.
    assert p.status["phase"] == "Pending" and p.status["attempt"] == 1 and "nextAttemptTime" not in p.status
    assert p.status["wandb"]["runId"].startswith("ftj-")
    running = run(job, p.status, [pod()])
    assert running.status["phase"] == "Running" and "nextAttemptTime" not in running.status
    assert running.create == ()
    cond = {c["type"]: c["status"] for c in running.status["conditions"]}
    assert cond["Running"] == "True"


def test_preemption_restarts_at_once_without_spending_the_failure_budget():
    job = make_job(backoffLimit=0)
    st = started(job)
    st["checkpoint"] = {"step": 40, "path": "", "time": "x"}
    gone = pod(gone=True, disruption=PREEMPTED, report=report("Preempted", step=40, ckpt=40))
    p = run(job, st, [gone])
    assert p.status["preemptions"] == 1 and p.status["failures"] == 0
    assert p.status["preemptionsByReason"] == {"PreemptionByScheduler": 1}
    assert p.status["attempt"] == 2 and p.status["lostSteps"] == 0
    assert pods_created(p) == ["demo-a2-0"]
    assert p.status["phase"] == "Restarting"
    assert p.status["lastDisruption"]["pod"] == "demo-a1-0"
    ev = next(e for e in p.events if e.reason == "Preempted")
    assert "demo-a1-0" in ev.message and "PreemptionByScheduler" in ev.message and "step 40" in ev.message
    assert p.preempted == "PreemptionByScheduler"
    # Replaying the same observation on the written status never counts twice.
    again = run(job, p.status, [gone, pod(attempt=2, phase="Pending")])
    assert again.status["preemptions"] == 1 and again.status["attempt"] == 2
    assert again.preempted is None and pods_created(again) == []
    settled = run(job, again.status, [gone, pod(attempt=2)])
    assert settled.status["phase"] == "Running"
    assert status_patch(settled.status, run(job, settled.status, [gone, pod(attempt=2)]).status) is None


def test_restarting_keeps_the_cause_while_the_old_pod_drains_and_the_new_one_starts():
    """The scheduler's preemption deletes the pod gracefully: it drains (Terminating), ends, is removed,
    and the replacement starts; each step is a reconcile of its own. The Restarting condition must
    name the preemption throughout, never the bookkeeping step that created the pod, and the
    replacement's AttemptStarted is posted once even while the watch has not shown it yet."""
    job = make_job(backoffLimit=0)
    st = started(job)
    draining = pod(phase="Running", deleting_since=T0, disruption=PREEMPTED)
    p = run(job, st, [draining])
    assert p.status["phase"] == "Restarting" and p.status["preemptions"] == 0
    assert get_condition(p.status, "Restarting")["reason"] == "PreemptionByScheduler"
    ended = replace(draining, phase="Failed", exit_code=143)
    counted = run(job, p.status, [ended], now=T0 + timedelta(seconds=1))
    assert counted.status["preemptions"] == 1 and pods_created(counted) == ["demo-a2-0"]
    started_events = [e for e in counted.events if e.reason == "AttemptStarted"]
    # The cache lags our create: the replacement is not seen yet (the controller's GET found it).
    lag = run(job, counted.status, [ended, pod(attempt=2, phase="Pending")], now=T0 + timedelta(seconds=2))
    gone = run(job, lag.status, [replace(ended, gone=True), pod(attempt=2, phase="Pending")])
    for step in (counted, lag, gone):
        cond = get_condition(step.status, "Restarting")
        assert cond["status"] == "True" and cond["reason"] == "PreemptionByScheduler"
        started_events += [e for e in step.events if e.reason == "AttemptStarted" and step is not counted]
    assert len(started_events) == 1 and pods_created(lag) == pods_created(gone) == []
    running = run(job, gone.status, [pod(gone=True), pod(attempt=2)], now=T0 + timedelta(seconds=3))
    assert running.status["phase"] == "Running"


def test_sigkill_loses_steps_since_checkpoint():
    job = make_job()
    st = started(job)
    st["progress"] = {"step": 57}
    st["checkpoint"] = {"step": 50}
    p = run(job, st, [pod(gone=True, disruption=("DeletionByTaintManager", ""))])
    assert p.status["lostSteps"] == 7 and p.lost_steps == 7


def test_failure_backs_off_then_retries():
    job = make_job(backoffLimit=2)
    st = started(job)
    failed = pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled")
    p = run(job, st, [failed])
    assert p.status["failures"] == 1 and p.status["preemptions"] == 0
    assert p.status["attempt"] == 2 and pods_created(p) == []
    assert p.requeue_after == pytest.approx(10)
    assert p.failed == "OOMKilled" and p.status["phase"] == "Restarting"
    early = run(job, p.status, [failed], now=T0 + timedelta(seconds=5))
    assert pods_created(early) == [] and early.requeue_after == pytest.approx(5)
    later = run(job, p.status, [failed], now=T0 + timedelta(seconds=11))
    assert pods_created(later) == ["demo-a2-0"]
    # Second failure doubles the wait.
    st2 = run(job, later.status, [failed, pod(attempt=2)], now=T0 + timedelta(seconds=12)).status
    p2 = run(job, st2, [failed, pod(attempt=2, phase="Failed", exit_code=1)], now=T0 + timedelta(seconds=20))
    assert p2.status["failures"] == 2 and p2.requeue_after == pytest.approx(20)


def test_backoff_limit_fails_the_job():
    job = make_job(backoffLimit=0)
    p = run(job, started(job), [pod(phase="Failed", exit_code=1)])
    assert p.status["phase"] == "Failed" and p.status["failures"] == 1
    failed = next(c for c in p.status["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "BackoffLimitExceeded")
    assert p.status["completionTime"]


def test_invalid_config_fails_at_once():
    job = make_job(backoffLimit=5)
    p = run(
        job,
        started(job),
        [
            pod(
                phase="Failed",
                exit_code=2,
                report=report("InvalidConfig", message="training.batchSize: must be > 0"),
            )
        ],
    )
    assert p.status["phase"] == "Failed" and p.status["failures"] == 0
    assert "training.batchSize" in p.status["message"]
    assert pods_created(p) == []


def test_success():
    job = make_job()
    p = run(
        job,
        started(job),
        [pod(phase="Succeeded", exit_code=0, report=report("Completed", step=100, ckpt=100))],
    )
    assert p.status["phase"] == "Succeeded" and p.status["progress"]["percent"] == 100
    assert p.status["checkpoint"]["step"] == 100 and p.status["completionTime"]


def test_max_preemptions():
    job = make_job(maxPreemptions=1)
    st = started(job)
    st["preemptions"] = 1
    p = run(job, st, [pod(gone=True)])
    assert p.status["phase"] == "Failed" and p.status["preemptions"] == 2
    assert "maxPreemptions" in p.status["message"]


def test_deadline_and_ttl():
    job = make_job(activeDeadlineSeconds=60, ttlSecondsAfterFinished=30)
    st = started(job)
    alive = run(job, st, [pod()], now=T0 + timedelta(seconds=30))
    assert alive.status["phase"] == "Running" and alive.requeue_after == pytest.approx(30)
    late = run(job, st, [pod()], now=T0 + timedelta(seconds=61))
    assert late.status["phase"] == "Failed" and "DeadlineExceeded" in {
        c["reason"] for c in late.status["conditions"]
    }
    assert late.delete_pods == ("demo-a1-0",)
    before = run(job, late.status, [pod(deleting_since=T0)], now=T0 + timedelta(seconds=80))
    assert not before.delete_job
    after = run(job, late.status, [], now=T0 + timedelta(seconds=92))
    assert after.delete_job


def test_suspend_and_resume_do_not_count():
    job = make_job()
    st = started(job)
    sus = replace(job, spec=replace(job.spec, run_policy=replace(job.spec.run_policy, suspend=True)))
    p = run(sus, st, [pod()])
    assert p.status["phase"] == "Suspended" and p.delete_pods == ("demo-a1-0",)
    assert p.status["preemptions"] == 0 and p.status["attempt"] == 2
    still = run(sus, p.status, [pod(phase="Failed", exit_code=143, deleting_since=T0)])
    assert still.status["preemptions"] == 0 and pods_created(still) == []
    resumed = run(job, still.status, [])
    assert pods_created(resumed) == ["demo-a2-0"] and resumed.status["preemptions"] == 0


def test_gang_restarts_together_and_waits_for_the_survivors():
    job = make_job(workers=2)
    p1 = run(job, {}, [])
    assert pods_created(p1) == ["demo-a1-0", "demo-a1-1"]
    st = run(job, p1.status, [pod(rank=0), pod(rank=1)]).status
    p = run(job, st, [pod(rank=0), pod(rank=1, gone=True, disruption=PREEMPTED)])
    assert p.status["preemptions"] == 1 and p.status["attempt"] == 2
    assert p.delete_pods == ("demo-a1-0",) and pods_created(p) == []
    waiting = run(
        job, p.status, [pod(rank=0, deleting_since=T0), pod(rank=1, gone=True, disruption=PREEMPTED)]
    )
    assert pods_created(waiting) == [] and waiting.status["preemptions"] == 1
    done = run(job, p.status, [pod(rank=0, phase="Failed", exit_code=143), pod(rank=1, gone=True)])
    assert pods_created(done) == ["demo-a2-0", "demo-a2-1"] and done.status["preemptions"] == 1


def test_gang_restart_is_named_by_the_disrupted_rank_not_the_one_that_stopped_with_it():
    # The scheduler's victim is still terminating (DisruptionTarget) when the other rank, stopped by the
    # all-reduced flag, has already exited 143: the victim's cause names the restart.
    job = make_job(workers=2)
    st = run(job, run(job, {}, []).status, [pod(rank=0), pod(rank=1)]).status
    victim = pod(rank=0, deleting_since=T0, disruption=PREEMPTED)
    p = run(job, st, [victim, pod(rank=1, phase="Failed", exit_code=143)])
    assert p.status["preemptions"] == 1 and p.status.get("failures", 0) == 0
    assert p.status["preemptionsByReason"] == {PREEMPTED[0]: 1}, p.status


def test_gang_failure_is_not_mistaken_for_a_disruption():
    job = make_job(workers=2)
    st = run(job, run(job, {}, []).status, [pod(rank=0), pod(rank=1)]).status
    p = run(job, st, [pod(rank=0), pod(rank=1, phase="Failed", exit_code=1)])
    assert p.status["failures"] == 1 and p.status["preemptions"] == 0 and p.delete_pods == ("demo-a1-0",)
    # The survivor we deleted ends later; it belongs to the finished attempt and is not counted.
    after = run(job, p.status, [pod(rank=0, gone=True), pod(rank=1, phase="Failed", exit_code=1)])
    assert after.status["preemptions"] == 0 and after.status["failures"] == 1


def test_waits_for_missing_dependencies():
    job = make_job()
    p = run(job, {}, [], missing=("PersistentVolumeClaim 'digits' (spec.data.claimName) in namespace ml",))
    assert pods_created(p) == [] and p.status["phase"] == "Pending"
    assert "spec.data.claimName" in p.status["message"] and p.requeue_after == 10


def test_stuck_terminating_pod_on_lost_node_is_force_deleted():
    job = make_job()
    st = started(job)
    stuck = pod(deleting_since=T0, node_name="gpu-1", disruption=("DeletionByTaintManager", ""))
    early = run(job, st, [stuck], now=T0 + timedelta(seconds=60), unready_nodes=frozenset({"gpu-1"}))
    assert early.force_delete_pods == ()
    late = run(job, st, [stuck], now=T0 + timedelta(seconds=121), unready_nodes=frozenset({"gpu-1"}))
    assert late.force_delete_pods == ("demo-a1-0",)
    healthy = run(job, st, [stuck], now=T0 + timedelta(seconds=121))
    assert healthy.force_delete_pods == ()


def test_progress_from_scrape():
    job = make_job()
    st = started(job)
    prog = lc.Progress(
        step=25,
        total_steps=100,
        epoch=1,
        samples_per_second=300.0,
        checkpoint_step=20,
        loss=0.5,
        steps_per_second=5.0,
    )
    p = run(job, st, [pod()], progress=prog)
    assert p.status["progress"] == {
        "step": 25,
        "totalSteps": 100,
        "percent": 25,
        "eta": "15s",
        "epoch": 1,
        "samplesPerSecond": 300.0,
    }
    assert p.status["checkpoint"]["step"] == 20 and p.status["metrics"] == {"loss": 0.5}


def test_backoff_grows_and_caps():
    assert [lc.backoff_seconds(n, SETTINGS) for n in (1, 2, 3, 10)] == [10, 20, 40, 300]


def test_missing_secret_shows_the_kubelets_reason_then_fails_after_the_start_timeout():
    job = make_job()
    st = run(job, {}, []).status
    waiting = pod(
        phase="Pending", waiting_reason="CreateContainerConfigError", waiting_message='secret "wb" not found'
    )
    p = run(job, st, [waiting])
    assert p.status["phase"] == "Pending" and 'secret "wb" not found' in p.status["message"]
    assert p.requeue_after == pytest.approx(301)
    late = run(job, p.status, [replace(waiting, created=OLD)])
    assert late.status["failures"] == 1 and late.failed == "ContainerConfig"


def test_early_stopped_is_a_success_with_its_own_reason():
    job = make_job()
    why = "stopped early at step 40: eval top1 did not improve in 3 evaluation(s)"
    ended = pod(phase="Succeeded", exit_code=0, report=report("EarlyStopped", step=40, ckpt=40, message=why))
    p = run(job, started(job), [ended])
    st = p.status
    assert st["phase"] == "Succeeded" and st["completionTime"]
    cond = get_condition(st, "Succeeded")
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "EarlyStopped"
    assert why in cond["message"] and why in st["message"]
    # the step it stopped at, not totalSteps
    assert st["progress"]["step"] == 40 and st["progress"]["percent"] == 40
    assert [e.reason for e in p.events] == ["EarlyStopped"]
    assert pods_created(p) == [] and p.failed is None and p.preempted is None


def test_best_and_top5_from_scrape():
    job = make_job()
    prog = lc.Progress(step=30, total_steps=100, accuracy=0.8, top5=0.95, best_metric=0.8123456, best_step=20)
    st = run(job, started(job), [pod()], progress=prog).status
    assert st["metrics"] == {"accuracy": 0.8, "top5": 0.95}
    assert (st["bestMetric"], st["bestStep"]) == (0.81235, 20)
    # a scrape without an evaluation yet keeps what was known
    again = run(job, st, [pod()], progress=lc.Progress(step=31, total_steps=100)).status
    assert (again["bestMetric"], again["bestStep"]) == (0.81235, 20)


def test_best_from_the_termination_message():
    job = make_job()
    message = (
        '{"reason": "Completed", "step": 100, "totalSteps": 100, "bestMetric": 0.25, "bestStep": 60, '
        '"bestMetricName": "loss"}'
    )
    end = pods.parse_report(message)
    assert end is not None
    st = run(job, started(job), [pod(phase="Succeeded", exit_code=0, report=end)]).status
    assert (st["bestMetric"], st["bestStep"], st["bestMetricName"]) == (0.25, 60, "loss")
    assert st["phase"] == "Succeeded" and get_condition(st, "Succeeded")["reason"] == "Completed"


def test_a_pod_gone_before_the_watch_showed_it_alive_is_a_disruption_not_a_twin():
    """Created, then preempted before any reconcile saw it Running: the next attempt follows; attempt 1
    is never created again (the deterministic name alone does not protect once the first pod is gone)."""
    job = make_job(backoffLimit=0)
    created = run(job, {}, [])
    assert pods_created(created) == ["demo-a1-0"]
    gone = pod(gone=True, disruption=PREEMPTED)
    p = run(job, created.status, [gone])
    assert pods_created(p) == ["demo-a2-0"] and p.status["attempt"] == 2
    assert p.status["preemptions"] == 1 and p.status["failures"] == 0
    assert [e.reason for e in p.events].count("AttemptStarted") == 1
    # Replays never create attempt 1 again, nor count twice.
    again = run(job, p.status, [gone, pod(attempt=2, phase="Pending")])
    assert pods_created(again) == [] and again.status["preemptions"] == 1


def test_a_refused_pod_create_waits_with_the_apis_words_and_counts_nothing():
    job = make_job(backoffLimit=0)
    created = run(job, {}, [])
    err = lc.CreateError(
        attempt=1,
        kind="Pod",
        name="demo-a1-0",
        status=403,
        message='pods "demo-a1-0" is forbidden: no PriorityClass with name gold was found',
    )
    p = run(job, created.status, [], create_error=err)
    assert pods_created(p) == [] and p.status["phase"] == "Pending"
    assert p.status["failures"] == 0 and p.status["preemptions"] == 0 and p.preempted is None
    cond = get_condition(p.status, "Blocked")
    assert cond["status"] == "True" and cond["reason"] == "CreateRefused"
    assert cond["message"] == p.status["message"]
    assert (
        "no PriorityClass with name gold" in cond["message"] and "spec.priorityClassName" in cond["message"]
    )
    assert [e.reason for e in p.events] == ["CreateRefused"]
    assert p.requeue_after == pytest.approx(10)
    # Before the backoff passes nothing happens; replaying posts no second Event.
    early = run(job, p.status, [], now=T0 + timedelta(seconds=5), create_error=err)
    assert pods_created(early) == [] and early.events == ()
    retry = run(job, p.status, [], now=T0 + timedelta(seconds=11), create_error=err)
    assert pods_created(retry) == ["demo-a1-0"]
    # Once the pod exists the Blocked condition turns False.
    ok = run(job, retry.status, [pod(phase="Pending")], now=T0 + timedelta(seconds=12))
    assert get_condition(ok.status, "Blocked")["status"] == "False"
    # Refused again: the wait doubles (retries counts the refusals in a row).
    again = lc.CreateError(**{**err.__dict__, "retries": 1})
    p2 = run(job, retry.status, [], now=T0 + timedelta(seconds=12), create_error=again)
    assert p2.requeue_after == pytest.approx(20) and p2.status["failures"] == 0


def test_an_invalid_pod_fails_the_job_once_naming_the_field():
    job = make_job()
    created = run(job, {}, [])
    err = lc.CreateError(
        1, "Pod", "demo-a1-0", 422, 'Pod "demo-a1-0" is invalid: spec.nodeSelector: Invalid value: "a b"'
    )
    p = run(job, created.status, [], create_error=err)
    assert p.status["phase"] == "Failed" and p.status["failures"] == 0
    assert get_condition(p.status, "Failed")["reason"] == "InvalidSpec"
    assert "spec.nodeSelector" in p.status["message"] and "HTTP 422" in p.status["message"]
    assert [e.reason for e in p.events] == ["InvalidSpec"]
    assert lc.job_field('Service "1job-workers" is invalid: metadata.name: Invalid value') == "metadata.name"
    assert lc.job_field("spec.containers[0].image: Invalid value") == "spec.image"


def test_a_partly_refused_gang_creates_only_the_missing_rank():
    job = make_job(workers=2)
    created = run(job, {}, [])
    assert pods_created(created) == ["demo-a1-0", "demo-a1-1"]
    err = lc.CreateError(1, "Pod", "demo-a1-1", 403, "exceeded quota: gpus")
    p = run(job, created.status, [pod(rank=0, phase="Pending")], create_error=err)
    assert p.status["phase"] == "Pending" and "spec.resources" in p.status["message"]
    retry = run(
        job, p.status, [pod(rank=0, phase="Pending")], now=T0 + timedelta(seconds=11), create_error=err
    )
    assert pods_created(retry) == ["demo-a1-1"]


def test_every_terminating_pod_is_rechecked_when_it_would_count_as_stuck():
    job = make_job()
    st = started(job)
    stuck = pod(deleting_since=T0, node_name="gpu-1", disruption=("DeletionByTaintManager", ""))
    # Its node is not known to be unready yet (the controller checks nodes only for overdue pods).
    early = run(job, st, [stuck], now=T0 + timedelta(seconds=60))
    assert early.force_delete_pods == () and early.requeue_after == pytest.approx(60)


def test_a_pod_held_by_a_finalizer_is_force_deleted_once_and_said_once():
    job = make_job()
    st = started(job)
    unready = frozenset({"gpu-1"})
    later = T0 + timedelta(seconds=121)
    stuck = pod(deleting_since=T0, node_name="gpu-1", finalizers=("example.com/hold",))
    first = run(job, st, [stuck], now=later, unready_nodes=unready)
    assert first.force_delete_pods == ("demo-a1-0",)
    held = replace(stuck, force_deleted=True)
    p = run(job, first.status, [held], now=later, unready_nodes=unready)
    assert p.force_delete_pods == ()
    cond = get_condition(p.status, "StuckTerminating")
    assert cond["status"] == "True" and "example.com/hold" in cond["message"]
    assert [e.reason for e in p.events] == ["StuckTerminating"]
    again = run(job, p.status, [held], now=later + timedelta(seconds=30), unready_nodes=unready)
    assert again.force_delete_pods == () and again.events == ()
    released = run(job, again.status, [replace(held, gone=True)], now=later + timedelta(seconds=40))
    assert get_condition(released.status, "StuckTerminating")["status"] == "False"


def test_an_invalid_image_name_is_a_config_error_at_once():
    job = make_job(backoffLimit=3)
    st = run(job, {}, []).status
    bad = pod(
        phase="Pending", waiting_reason="InvalidImageName", waiting_message='couldn\'t parse image " x"'
    )
    p = run(job, st, [bad])
    assert p.status["phase"] == "Failed" and p.status["failures"] == 0
    assert "spec.image" in p.status["message"]


def test_pods_recorded_but_never_seen_are_created_without_counting():
    """The operator stopped between the status write and the create: after a restart neither the watch nor
    a GET knows the pod. It is created then; nothing is counted (no pod of that attempt ever ran)."""
    job = make_job(maxPreemptions=0)
    recorded = run(job, {}, []).status
    p = run(job, recorded, [], now=T0 + timedelta(seconds=30))
    assert pods_created(p) == ["demo-a1-0"] and p.status["attempt"] == 1
    assert p.status["preemptions"] == 0 and p.status["failures"] == 0 and p.status["phase"] == "Pending"


def test_a_create_error_is_ignored_once_every_rank_exists():
    """A create that timed out but happened: the pod is seen, so the job runs and is not Blocked."""
    job = make_job()
    created = run(job, {}, [])
    err = lc.CreateError(1, "Pod", "demo-a1-0", 0, "timeout")
    p = run(job, created.status, [pod()], create_error=err)
    assert p.status["phase"] == "Running" and get_condition(p.status, "Blocked") is None


def test_a_refused_replacement_keeps_the_restart_cause_and_suspend_clears_blocked():
    job = make_job()
    st = started(job)
    p = run(job, st, [pod(gone=True, disruption=PREEMPTED)])
    assert pods_created(p) == ["demo-a2-0"]
    err = lc.CreateError(2, "Pod", "demo-a2-0", 403, "exceeded quota: gpus")
    refused = run(job, p.status, [pod(gone=True)], create_error=err)
    assert get_condition(refused.status, "Restarting")["reason"] == "PreemptionByScheduler"
    assert get_condition(refused.status, "Blocked")["status"] == "True"
    assert "exceeded quota" in refused.status["message"]
    suspended = run(make_job(suspend=True), refused.status, [pod(gone=True)])
    assert suspended.status["phase"] == "Suspended"
    assert get_condition(suspended.status, "Blocked")["status"] == "False"


def test_job_status_is_parsed_once_for_the_controller():
    from kubetune_operator.status import JobStatus

    assert JobStatus.parse(None) == JobStatus()
    created = JobStatus.parse(run(make_job(), {}, []).status)
    assert created.attempt == 1 and created.pods_created and not created.finished
    due = JobStatus.parse({"attempt": "2", "nextAttemptTime": "2026-11-29T12:00:00Z", "phase": "Restarting"})
    assert due.attempt == 2 and not due.pods_created and due.next_attempt_time == T0
    assert JobStatus.parse({"phase": "Failed", "attempt": "x"}) == JobStatus(phase="Failed")
    assert JobStatus.parse({"phase": "Failed"}).finished
