"""`kubetune-operator`: run the FineTuneJob operator (kopf under the hood)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import kopf

from kubetune_operator import lifecycle
from kubetune_operator.controller import Controller, ControllerConfig
from kubetune_operator.runtime import ElectionTiming


@dataclass
class Options:
    kubeconfig: str | None
    controller: ControllerConfig
    leader_election: bool
    leader_namespace: str
    leader_name: str
    identity: str
    metrics_port: int
    election: ElectionTiming

    def metrics_ready(self, controller: Controller) -> None:
        if self.metrics_port:
            controller.metrics.serve(self.metrics_port)


def _positive(kind: type, flag: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 0, got {text!r}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetune-operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="watch only this namespace (repeatable)"
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then $KUBECONFIG)"
    )
    p.add_argument(
        "--trainer-image",
        default=os.environ.get("KUBETUNE_TRAINER_IMAGE", ""),
        help="trainer image for jobs that do not set spec.image",
    )
    p.add_argument(
        "--metrics-port",
        type=_positive(int, "--metrics-port"),
        default=8080,
        help="Prometheus metrics port (0 = off)",
    )
    p.add_argument(
        "--health-port",
        type=_positive(int, "--health-port"),
        default=8081,
        help="liveness endpoint port, /healthz (0 = off)",
    )
    p.add_argument("--workers", type=_positive(int, "--workers"), default=8, help="parallel reconciles")
    p.add_argument(
        "--scrape-interval",
        type=_positive(float, "--scrape-interval"),
        default=10.0,
        help="seconds between scrapes of a running trainer's metrics",
    )
    p.add_argument(
        "--backoff-base-seconds",
        type=_positive(float, "--backoff-base-seconds"),
        default=10.0,
        help="first retry delay after a failure; doubles per failure",
    )
    p.add_argument("--backoff-max-seconds", type=_positive(float, "--backoff-max-seconds"), default=300.0)
    p.add_argument(
        "--start-timeout-seconds",
        type=_positive(float, "--start-timeout-seconds"),
        default=300.0,
        help="a pod whose image cannot be pulled for this long counts as failed",
    )
    p.add_argument(
        "--stuck-terminating-seconds",
        type=_positive(float, "--stuck-terminating-seconds"),
        default=120.0,
        help="force-delete pods Terminating this long on a NotReady or vanished node",
    )
    p.add_argument("--wandb-url-base", default=None, help="e.g. https://wandb.ai/ENTITY/PROJECT/runs")
    p.add_argument(
        "--no-leader-election",
        dest="leader_election",
        action="store_false",
        help="act without holding the Lease (only for a single replica)",
    )
    p.add_argument(
        "--kueue",
        choices=("auto", "off"),
        default="auto",
        help="auto: queue FineTuneJobs labelled kueue.x-k8s.io/queue-name through Kueue when its Workload "
        "API is served; off: ignore the label (the chart's kueue.enabled=false)",
    )
    p.add_argument("--leader-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    p.add_argument("--leader-name", default="kubetune-operator")
    p.add_argument(
        "--lease-seconds",
        type=_positive(int, "--lease-seconds"),
        default=ElectionTiming.lease_seconds,
        help="a follower takes over after seeing no renew of the Lease for this long",
    )
    p.add_argument(
        "--renew-deadline-seconds",
        type=_positive(float, "--renew-deadline-seconds"),
        default=ElectionTiming.renew_deadline_seconds,
        help="the leader stops acting when it has not renewed for this long (< --lease-seconds)",
    )
    p.add_argument(
        "--retry-period-seconds",
        type=_positive(float, "--retry-period-seconds"),
        default=ElectionTiming.retry_period_seconds,
        help="seconds between attempts to acquire or renew the Lease",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.workers < 1:
        parser().error("--workers must be at least 1")
    election = ElectionTiming(args.lease_seconds, args.renew_deadline_seconds, args.retry_period_seconds)
    if problem := election.problem():
        parser().error(problem)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler call at INFO; ours are cache updates, so keep only problems.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    config = ControllerConfig(
        trainer_image=args.trainer_image,
        workers=args.workers,
        scrape_interval=args.scrape_interval,
        lifecycle=lifecycle.Settings(
            backoff_base_seconds=args.backoff_base_seconds,
            backoff_max_seconds=args.backoff_max_seconds,
            start_timeout_seconds=args.start_timeout_seconds,
            stuck_terminating_seconds=args.stuck_terminating_seconds,
            wandb_url_base=args.wandb_url_base,
        ),
        namespaces=tuple(args.namespace),
        kueue=args.kueue,
    )
    options = Options(
        kubeconfig=args.kubeconfig,
        controller=config,
        leader_election=args.leader_election,
        leader_namespace=args.leader_namespace,
        leader_name=args.leader_name,
        identity=f"{socket.gethostname()}-{os.getpid()}",
        metrics_port=args.metrics_port,
        election=election,
    )
    import kubetune_operator.handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
        memo=kopf.Memo(options=options),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
