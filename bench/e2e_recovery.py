"""Recovery on a real node: from a disruption to the first training step of the next attempt.

One FineTuneJob on the real kubelet node (tests/e2e/scenario.py) is disrupted four ways in turn:
scheduler preemption, Eviction API, `kubectl delete pod` (all SIGTERM with a 30 s grace period) and a
SIGKILL of the container's PID 1 from the host. For each: `operator_reaction_s` (disruption to the next
attempt's pod object), `pod_start_s` (pod object to container running: scheduling, sandbox, CNI,
container start), `checkpoint_load_to_first_step_s` (container running to the first step past the
resumed one: Python/torch import, data, checkpoint load, one step), their sum `disruption_to_first_step_s`,
and `sigterm_to_exit_s` (disruption to the trainer's exit: the SIGTERM checkpoint) against the grace period.
Then a `workers: 2` DDP job (`ddp_*`): the scheduler preempts rank 1, the whole gang stops and the next
attempt's two pods resume; `ddp_disruption_to_first_step_s` ends at the first step of the new gang (a
DDP step completes on both ranks at once: its gradients are all-reduced). Then a Kueue priority preemption of a queued job through the real Kueue (`kueue_*`: eviction to the
checkpoint durable, to Queued, to the exit; re-admission to the next pod and to the first training step).
Needs root and the real-node packages; starts and stops its own cluster (see docs/real-node.md).
"""

from __future__ import annotations

import time
from typing import Any

KINDS = ("scheduler-preemption", "eviction", "delete", "sigkill")
STEPS, EVERY, GRACE = 400, 20, 30


def run() -> dict[str, Any]:
    from tests.e2e import scenario as sc

    cluster = sc.Cluster()
    t0 = time.monotonic()
    try:  # a failed `up` leaves parts behind too: `down` cleans them
        cluster.up()
        images_log = cluster.images()
        env = sc.Env(cluster)
        sc.prepare_namespace(env)
        sc.install_operator(env)
        sc.dataset(env)
        setup_s = time.monotonic() - t0
        job = "bench-recovery"
        sc.create_job(env, job, STEPS, EVERY, GRACE)
        out: dict[str, Any] = {"setup_s": round(setup_s, 1), "grace_period_s": GRACE, "every_steps": EVERY}
        for kind in KINDS:
            d = sc.disrupt(env, job, kind, EVERY + 5, log=lambda _m: None)
            s = d.summary(GRACE)
            out[kind] = s
            key = kind.replace("-", "_")
            for field in (
                "operator_reaction_s",
                "pod_start_s",
                "checkpoint_load_to_first_step_s",
                "disruption_to_first_step_s",
                "sigterm_to_exit_s",
            ):
                out[f"{key}_{field}"] = s[field]
        st = sc.wait_done(env, job)
        out.update(
            phase=st.get("phase"),
            preemptions=st.get("preemptions"),
            failures=st.get("failures", 0),
            lost_steps=st.get("lostSteps", 0),
            images_log=images_log.splitlines(),
        )
        out.update(_ddp(sc, env))
        out.update(_kueue(sc, env))
        return out
    finally:
        cluster.down()


def _ddp(sc: Any, env: Any) -> dict[str, Any]:
    """Gang recovery: rank 1 of a 2-worker job preempted by the scheduler, to the new gang's first step."""
    job = "bench-ddp"
    sc.create_job(env, job, 160, EVERY, GRACE, cpu="500m", workers=2)
    d = sc.disrupt(env, job, "scheduler-preemption", EVERY + 5, log=lambda _m: None, rank=1)
    st = sc.wait_done(env, job)
    s = d.summary(GRACE)
    out: dict[str, Any] = {"ddp_preemption": s}
    for key, value in s.items():
        if key.endswith("_s") and key != "grace_period_s":
            out[f"ddp_{key}"] = value
    out.update(
        ddp_phase=st.get("phase"),
        ddp_preemptions=st.get("preemptions"),
        ddp_failures=st.get("failures", 0),
        ddp_lost_steps=st.get("lostSteps", 0),
    )
    return out


def _kueue(sc: Any, env: Any) -> dict[str, Any]:
    """A Kueue priority preemption of a labelled job (the real Kueue): eviction to the SIGTERM checkpoint
    being durable, to the job Queued and to the trainer's exit; the preemptor's success to re-admission is
    Kueue's; re-admission to the next attempt's pod and to its first training step."""
    low, high = "bench-kq-low", "bench-kq-high"
    sc.kueue_up(env)
    try:
        ckpt = sc.create_job(env, low, 160, EVERY, GRACE, labels=sc.queue_labels(sc.KUEUE_LOW))
        kp = sc.kueue_preempt(env, low, ckpt, high, EVERY + 5, log=lambda _m: None)
        st = sc.wait_done(env, low)
        s = kp.summary()
        out: dict[str, Any] = {"kueue_preemption": s}
        for key, value in s.items():
            if key.endswith("_s"):
                out[f"kueue_{key}"] = value
        out.update(
            kueue_phase=st.get("phase"),
            kueue_preemptions_by_reason=st.get("preemptionsByReason"),
            kueue_failures=st.get("failures", 0),
            kueue_lost_steps=st.get("lostSteps", 0),
        )
        return out
    finally:
        sc.kueue_down(env, low, high)
