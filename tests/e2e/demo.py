"""`make demo`: the scenario of tests/e2e with a live view and a summary (run by hack/demo.sh).

    python -m tests.e2e.demo [--keep] [--verify] [--steps N] [--every N]

Starts the local cluster with the real node, builds/imports the images (cached), helm-installs the chart,
creates the digits FineTuneJob, preempts it three times for real while a table shows the job, and prints
attempts, reasons, lost steps, time to recover and where the model is. --verify also trains the same
manifest uninterrupted on the host and compares the final weights bit for bit. Then a 2-worker DDP job
(rendezvous through cluster DNS) has one worker preempted and is compared with `torchrun
--nproc-per-node 2` on the host.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tests.e2e import scenario as sc

# Wide enough for the tables when the output is a log file rather than a terminal.
console = Console(width=None if sys.stdout.isatty() else 140)


def job_table(env: sc.Env, job: str) -> Table:
    t = Table(title=f"kubectl get ftj {job} (live)", expand=False)
    for col in ("PHASE", "STEP", "CHECKPOINT", "ATTEMPT", "PREEMPTIONS", "FAILURES", "LOST", "POD", "POD IP"):
        t.add_column(col)
    try:
        st = env.status(job)
    except Exception as exc:
        t.add_row(f"({type(exc).__name__})", *[""] * 8)
        return t
    pod = sc.running_trainer(env, job)
    t.add_row(
        str(st.get("phase", "")),
        f"{(st.get('progress') or {}).get('step', '')}/{(st.get('progress') or {}).get('totalSteps', '')}",
        str((st.get("checkpoint") or {}).get("step", "")),
        str(st.get("attempt", "")),
        f"{st.get('preemptions', 0)} {st.get('preemptionsByReason') or ''}",
        str(st.get("failures", 0)),
        str(st.get("lostSteps", 0)),
        pod.metadata.name if pod else "-",
        (pod.status.pod_ip or "-") if pod else "-",
    )
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__)
    p.add_argument("--keep", action="store_true", help="leave the cluster running at the end")
    p.add_argument("--verify", action="store_true", help="compare with an uninterrupted host run")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args(argv)

    cluster = sc.Cluster()
    t0 = time.monotonic()
    console.rule("kubetune demo: a real node, real preemptions, exact resume")
    console.print(
        f"cluster in {cluster.dir} (apiserver 127.0.0.1:{cluster.api_port}) with real node {sc.REAL_NODE}"
    )
    try:  # a failed `up` leaves parts behind too: `down` cleans them
        cluster.up()
        console.print("images (debootstrap base, buildah builds of both Dockerfiles; cached):")
        for line in cluster.images().splitlines():
            console.print(f"  {line}")
        env = sc.Env(cluster)
        sc.prepare_namespace(env)
        sc.install_operator(env)
        op = sc.operator_pod(env)
        console.print(f"operator pod {op.metadata.name} on {op.spec.node_name} ({op.status.pod_ip})")
        digits = sc.dataset(env)
        job = "digits"
        ckpt = sc.create_job(env, job, args.steps, args.every, tensorboard=True)
        console.print(f"FineTuneJob {env.namespace}/{job}: test_resnet on digits, {args.steps} steps, "
                      f"checkpoint every {args.every}")  # fmt: skip

        disruptions: list[sc.Disruption] = []
        errors: list[BaseException] = []
        t_job = time.monotonic()

        def drive() -> None:
            try:
                for kind in ("scheduler-preemption", "eviction", "delete"):
                    disruptions.append(sc.disrupt(env, job, kind, args.every + 5, log=console.log))
                sc.wait_done(env, job)
            except BaseException as exc:
                errors.append(exc)

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        with Live(job_table(env, job), console=console, refresh_per_second=2) as live:
            while driver.is_alive():
                live.update(job_table(env, job))
                time.sleep(0.5)
            live.update(job_table(env, job))
        if errors:
            raise errors[0]
        st = env.status(job)
        summary(env, job, st, disruptions, ckpt, time.monotonic() - t_job)
        board = sc.check_tensorboard(env, job, sc.REPO / "bench" / "results" / "tensorboard.png")
        steps = board["steps"]
        console.print(
            f"tensorboard: pod {board['pod']} serves one record of {len(steps)} steps "
            f"({steps[0]}..{steps[-1]}, each once: {steps == sorted(set(steps))}); screenshot {board['png']}\n"
            f"  see it{'' if args.keep else ' (after make demo DEMO_ARGS=--keep)'}: KUBECONFIG={cluster.kubeconfig} "
            f"{sc.BIN}/kubectl -n {env.namespace} port-forward svc/{sc.tensorboard_service(job)} 6006"
            "   # then open http://127.0.0.1:6006"
        )
        if args.verify:
            same = (ckpt / "final" / "model.safetensors").read_bytes() == sc.reference_weights(
                env, job, args.steps, args.every, digits
            )
            console.print(f"final weights bitwise equal to an uninterrupted host run: [bold]{same}[/bold]")
        ddp_ok = ddp(env, digits, args.every)
        console.print(f"demo took {time.monotonic() - t0:.0f}s")
        return 0 if st.get("phase") == "Succeeded" and ddp_ok else 1
    finally:
        if args.keep:
            console.print(f"cluster left running: export KUBECONFIG={cluster.kubeconfig}")
        else:
            cluster.down()


DDP_STEPS, DDP_CPU = 160, "500m"


def ddp(env: sc.Env, digits: Any, every: int) -> bool:
    """A `workers: 2` job: two pods rendezvous through the headless Service (cluster DNS); one worker is
    preempted by the scheduler; the gang restarts; the weights are compared with `torchrun
    --nproc-per-node 2` on the host."""
    job = "digits-ddp"
    console.rule("multi-worker DDP: 2 pods, torchrun rendezvous through cluster DNS, one worker preempted")
    ckpt = sc.create_job(env, job, DDP_STEPS, every, cpu=DDP_CPU, workers=2)
    d = sc.disrupt(env, job, "scheduler-preemption", every + 5, log=console.log, rank=1)
    st = sc.wait_done(env, job)
    final = ckpt / "final" / "model.safetensors"
    same = final.is_file() and final.read_bytes() == sc.reference_weights(
        env, job, DDP_STEPS, every, digits, workers=2, cpu=DDP_CPU
    )
    s = d.summary(grace=30)
    victim = (st.get("lastDisruption") or {}).get("pod", "?")
    console.print(
        f"gang recovery: the scheduler preempted {victim} at step {d.step_at_disruption}; "
        f"{d.next_pod} (and its rank 1) resumed at step {d.resumed_from}, first step "
        f"{s['disruption_to_first_step_s']} s after the preemption"
    )
    console.print(
        f"ddp: {st.get('phase')}, preemptions {st.get('preemptions', 0)}, failures {st.get('failures', 0)}, "
        f"bitwise equal: {'yes' if same else 'no'}"
    )
    return bool(st.get("phase") == "Succeeded" and same)


def summary(
    env: sc.Env, job: str, st: dict[str, Any], dis: list[sc.Disruption], ckpt: Any, took: float
) -> None:
    console.rule("summary")
    console.print(
        f"phase [bold]{st.get('phase')}[/bold] in {took:.0f}s; attempts {int(st.get('attempt', 0))}; "
        f"preemptions {st.get('preemptions')} {st.get('preemptionsByReason') or ''}; "
        f"failures {st.get('failures', 0)}; lost steps {st.get('lostSteps', 0)}"
    )
    t = Table(title="disruptions")
    for col in ("kind", "pod", "exit", "at step", "resumed from", "SIGTERM->exit s", "operator s", "pod start s",
                "load->1st step s", "total s"):  # fmt: skip
        t.add_column(col)
    for d in dis:
        s = d.summary(grace=30)
        t.add_row(
            d.kind, d.pod, str(d.exit_code), str(d.step_at_disruption), str(d.resumed_from),
            str(s["sigterm_to_exit_s"]), str(s["operator_reaction_s"]), str(s["pod_start_s"]),
            str(s["checkpoint_load_to_first_step_s"]), str(s["disruption_to_first_step_s"]),
        )  # fmt: skip
    console.print(t)
    console.print(f"operator metrics (pod IP): {sc.operator_preemptions(env)}")
    console.print(
        f"model: {ckpt / 'final' / 'model.safetensors'} (claim {env.namespace}/{job}-ckpt-e2e, final/)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
