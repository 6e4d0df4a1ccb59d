"""The product end to end on a real kubelet node: real containers get SIGTERM (or SIGKILL), checkpoint and
resume; the job ends with the same bits as an uninterrupted run. See tests/e2e/scenario.py, docs/real-node.md.

Needs root, the real-node Debian packages (hack/apt-packages-real-node.txt) and ~15 GB of disk for the
trainer image (CUDA torch from PyPI). Starts its own cluster in $KUBETUNE_E2E_CLUSTER_DIR
(default /tmp/kubetune-e2e, apiserver on 6543) and stops it at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import scenario as sc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS, EVERY, GRACE = 240, 20, 30


@pytest.mark.timeout(1800)
def test_three_real_preemptions_resume_exactly(env: sc.Env, digits: Path) -> None:
    job = "digits"
    ckpt = sc.create_job(env, job, STEPS, EVERY, GRACE, tensorboard=True)
    progress: list[int] = []

    def tick(st: dict) -> None:  # type: ignore[type-arg]
        step = (st.get("progress") or {}).get("step")
        if step is not None and (not progress or progress[-1] != step):
            progress.append(step)

    log = print
    disruptions = []
    served_while_training: list[int] = []
    for kind in ("scheduler-preemption", "eviction", "delete"):
        disruptions.append(sc.disrupt(env, job, kind, min_progress=EVERY + 5, log=log))
        tick(env.status(job))
        if kind == "scheduler-preemption":  # the board of a running attempt, through the same Service
            sc.tensorboard_ready(env, job)
            with sc.port_forward(env, f"svc/{sc.tensorboard_service(job)}", sc.TB_PORT) as port:
                served_while_training = sc.tensorboard_scalar_steps(port)
    st = sc.wait_done(env, job, on_tick=tick)

    assert st["phase"] == "Succeeded", st
    assert st.get("preemptions") == 3, st
    assert st.get("failures", 0) == 0, st
    assert st.get("lostSteps", 0) == 0, st
    # Every SIGTERM'd trainer exited 143 inside the grace period and the next attempt resumed where it
    # stopped (no step lost, none repeated).
    for d in disruptions:
        assert d.exit_code == 143, d
        assert d.stopped_at is not None and d.stopped_at - d.at < GRACE, d
        assert d.resumed_from is not None and d.step_at_disruption is not None
        assert d.resumed_from >= d.step_at_disruption, d
    # Status progress moved while it ran (the operator scraped the pod IP).
    assert len(progress) >= 3 and progress == sorted(progress), progress

    # Bitwise equal to an uninterrupted host run of the same manifest.
    final = ckpt / "final" / "model.safetensors"
    assert final.is_file(), sorted(p.name for p in ckpt.iterdir())
    assert final.read_bytes() == sc.reference_weights(env, job, STEPS, EVERY, digits)

    # One W&B run id across four attempts; steps strictly increasing, each once.
    ids, steps = sc.wandb_history_steps(ckpt)
    assert len(ids) == 1, ids
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps[-10:]

    # One TensorBoard record across the four attempts, served through the Service while the job trained
    # and after it ended: each step once, in order, none missing; and a browser draws it.
    assert served_while_training and served_while_training == sorted(set(served_while_training))
    board = sc.check_tensorboard(env, job, sc.REPO / "bench" / "results" / "tensorboard.png")
    assert board["steps"] == list(range(1, STEPS + 1)), board["steps"][:20]
    assert board["curve_pixels"] > 200, board  # the scalars page drew curves (see the PNG)

    # The operator (a pod) counted the three preemptions by reason.
    by_reason = sc.operator_preemptions(env)
    assert sum(by_reason.values()) >= 3, by_reason
    reasons = " ".join(by_reason)
    for r in ("PreemptionByScheduler", "EvictionByEvictionAPI"):
        assert r in reasons, by_reason


@pytest.mark.timeout(1200)
def test_sigkill_loses_at_most_one_interval(env: sc.Env, digits: Path) -> None:
    job = "digits-kill"
    sc.create_job(env, job, 120, EVERY, GRACE)
    d = sc.disrupt(env, job, "sigkill", min_progress=EVERY + 5, log=print)
    st = sc.wait_done(env, job)
    assert st["phase"] == "Succeeded", st
    assert d.exit_code == 137, d
    assert 0 < st.get("lostSteps", 0) <= EVERY, st
    # A kill without grace is a disruption, not the job's failure: it never spends backoffLimit.
    assert st.get("preemptionsByReason") == {"SIGKILL": 1} and st.get("failures", 0) == 0, st
