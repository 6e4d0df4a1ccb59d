"""Multi-worker DDP on the real node: cluster DNS (CoreDNS) resolves the workers' headless Service, two
real pods rendezvous through it (torchrun, gloo on CPU), the real scheduler preempts one worker mid-run,
the gang stops and checkpoints, the next attempt's two pods resume, and the final weights are byte-equal
to an uninterrupted `torchrun --nproc-per-node 2` run of the same spec on the host.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import scenario as sc

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

JOB = "ddp"
STEPS, EVERY, GRACE, CPU = 160, 20, 30, "500m"


@pytest.mark.timeout(600)
def test_cluster_dns_resolves_services_and_pod_hostnames(env: sc.Env) -> None:
    ns = env.namespace
    names = [
        "kubernetes.default.svc.cluster.local",
        "kubernetes.default",  # through the pod's search path
        f"probe.probe-dns.{ns}.svc.cluster.local",  # a pod's hostname under its headless Service
        "probe.probe-dns",  # how the operator names rank 0 to torchrun
    ]
    out = sc.dns_probe(env, names, missing=[f"nothing-here.{ns}.svc.cluster.local"])
    assert "nameserver 10.245.0.1" in out["resolv"] and f"search {ns}.svc.cluster.local" in out["resolv"], out
    got = out["names"]
    assert got["kubernetes.default.svc.cluster.local"] == ["10.96.0.1"], got
    assert got["kubernetes.default"] == ["10.96.0.1"], got
    assert got[f"probe.probe-dns.{ns}.svc.cluster.local"] == [out["pod_ip"]], (got, out["pod_ip"])
    assert got["probe.probe-dns"] == [out["pod_ip"]], got
    assert isinstance(got[f"nothing-here.{ns}.svc.cluster.local"], str), got  # NXDOMAIN, not an answer


@pytest.mark.timeout(1800)
def test_a_preempted_ddp_worker_restarts_the_gang_and_resumes_bitwise_equal(
    env: sc.Env, digits: Path
) -> None:
    ckpt = sc.create_job(env, JOB, STEPS, EVERY, GRACE, cpu=CPU, workers=2)
    # The preemptor needs the room of one worker; which one goes is the scheduler's choice (among equal
    # priorities, the one that started last).
    d = sc.disrupt(env, JOB, "scheduler-preemption", EVERY + 5, log=print, rank=1)
    print("ddp gang recovery:", d.summary(GRACE))
    st = sc.wait_done(env, JOB)
    assert st["phase"] == "Succeeded", st
    assert st.get("preemptions") == 1 and st.get("failures", 0) == 0, st
    assert st.get("preemptionsByReason") == {"PreemptionByScheduler": 1}, st
    assert st.get("lostSteps", 0) == 0, st
    gang = [f"{JOB}-a1-0", f"{JOB}-a1-1"]
    assert st["lastDisruption"]["pod"] in gang, st
    # The whole gang stopped cleanly: the victim on its SIGTERM, the other rank on the all-reduced stop
    # flag (both checkpointed at the same step), each container exiting 143 (kubetune_trainer.launch).
    exits = {
        pod: sc.wait_for(lambda p=pod: env.terminations.seen.get(p), 60, desc=f"{pod}'s exit") for pod in gang
    }
    assert {pod: code for pod, (code, _) in exits.items()} == dict.fromkeys(gang, 143), exits
    assert d.resumed_from is not None and d.step_at_disruption is not None
    assert d.resumed_from >= d.step_at_disruption, d
    assert st.get("attempt") == 2 and d.next_pod == f"{JOB}-a2-0", (st, d)  # one gang restart

    final = ckpt / "final" / "model.safetensors"
    assert final.is_file(), sorted(p.name for p in ckpt.iterdir())
    assert final.read_bytes() == sc.reference_weights(env, JOB, STEPS, EVERY, digits, workers=2, cpu=CPU)
