"""A Kueue priority preemption on the real node, with real containers: the real Kueue (hack/cluster.sh
kueue up) admits a low-priority FineTuneJob; a high-priority one needs its quota, so Kueue evicts the
first. Its trainer gets SIGTERM, checkpoints and exits 143; the job waits Queued, is re-admitted when the
high one finished, resumes from the checkpoint and ends with the same bits as an uninterrupted run.

Kueue is started for this module and stopped after it (the chart's kueue.enabled is turned on, then off),
so the other e2e tests run on a cluster without Kueue.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import scenario as sc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LOW, HIGH = "kq-low", "kq-high"
STEPS, EVERY, GRACE = 120, 20, 30


@pytest.fixture(scope="module")
def kueue(env: sc.Env) -> Iterator[sc.Env]:
    sc.kueue_up(env)
    yield env
    sc.kueue_down(env, LOW, HIGH)


@pytest.mark.timeout(1500)
def test_a_kueue_preemption_loses_no_step_and_resumes_bitwise_equal(kueue: sc.Env, digits: Path) -> None:
    env = kueue
    ckpt = sc.create_job(env, LOW, STEPS, EVERY, GRACE, labels=sc.queue_labels(sc.KUEUE_LOW))
    kp = sc.kueue_preempt(env, LOW, ckpt, HIGH, min_progress=EVERY + 5, log=print)
    print("kueue preemption on the real node:", kp.summary())

    # The graceful stop: SIGTERM, a checkpoint at (or past) the step it had reached, exit 143 within the
    # grace period; the job said Queued meanwhile.
    assert kp.exit_code == 143, kp
    assert kp.step_at_preemption is not None and kp.durable_step is not None
    assert kp.durable_step >= kp.step_at_preemption, kp
    assert kp.evicted_at is not None and kp.stopped_at is not None and kp.stopped_at - kp.evicted_at < GRACE
    assert kp.recovery is not None and (kp.recovery.resumed_from or 0) >= kp.durable_step, kp.recovery

    high = sc.wait_done(env, HIGH)
    assert high["phase"] == "Succeeded", high
    assert sc.condition(sc.workload_of(env, HIGH), "Finished")  # its quota was released at once
    st = sc.wait_done(env, LOW)
    assert st["phase"] == "Succeeded", st
    assert st.get("preemptionsByReason") == {"KueuePreempted": 1}, st
    assert st.get("failures", 0) == 0 and st.get("lostSteps", 0) == 0, st
    assert st["kueue"]["localQueue"] == sc.KUEUE_QUEUE and st["kueue"]["admitted"] is True, st["kueue"]
    assert sc.condition(sc.workload_of(env, LOW), "Finished")

    final = ckpt / "final" / "model.safetensors"
    assert final.is_file(), sorted(p.name for p in ckpt.iterdir())
    assert final.read_bytes() == sc.reference_weights(env, LOW, STEPS, EVERY, digits)
