"""Thin kopf handlers: feed watch events into the controller's caches; settings in one startup hook.

kopf owns the FineTuneJob watch (re-listing on start and after errors, which is how a restarted operator
catches up), health probes and logging; the controller owns the pod watch (its own informer, which
notices pods deleted while the watch was down), deciding and writing. No handler here
adds a finalizer: uninstalling the operator never leaves FineTuneJobs that cannot be deleted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from kubetune_operator.api import GROUP, PLURAL, VERSION
from kubetune_operator.controller import Controller
from kubetune_operator.kube import Kube, load_configuration
from kubetune_operator.runtime import LeaderElector

log = logging.getLogger(__name__)


@kopf.on.login()
def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    """kopf and the controller use the same credentials (kubeconfig or in-cluster service account)."""
    cfg = load_configuration(memo.options.kubeconfig)
    header = str(
        cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization") or ""
    )
    scheme, _sep, value = header.partition(" ")
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        scheme=scheme or None,
        token=value or None,
    )


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    opts = memo.options
    # We post our own Events (one per lifecycle transition); kopf's per-log-line events would be noise.
    settings.posting.enabled = False
    # Watches reconnect every few minutes even when idle, so a silently dropped stream heals.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Handlers only update caches: no need for kopf's retries/backoff or persisted progress.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetune.io")
    # Enough parallel event workers for many jobs; each handler call is a dict update.
    settings.batching.worker_limit = 64
    controller = Controller(Kube(load_configuration(opts.kubeconfig)), opts.controller)
    memo.controller = controller
    opts.metrics_ready(controller)
    await controller.start()
    memo.stop_election = asyncio.Event()
    if opts.leader_election:
        elector = LeaderElector(
            controller.kube,
            opts.leader_namespace,
            opts.leader_name,
            opts.identity,
            controller.set_leader,
            opts.election,
            # Stop workers from starting a reconcile the instant the renew deadline passes.
            stop_now=controller.active.clear,
        )
        memo.elector = elector
        memo.election_task = asyncio.create_task(elector.run(memo.stop_election))
    else:
        await controller.set_leader(True)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    """Stop acting and release the Lease (the elector does both when stopped) before the API client
    closes, so a follower takes over within one retry period instead of a lease duration."""
    memo.stop_election.set()
    task = memo.get("election_task")
    if task is not None:
        try:
            # The release is bounded by the renew deadline; this only guards against a hang.
            await asyncio.wait_for(task, timeout=memo.options.election.renew_deadline_seconds + 5)
        except Exception as err:  # the controller must still stop
            log.warning("leader election did not stop cleanly: %s", str(err) or type(err).__name__)
    await memo.controller.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
def job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.job_event(event.get("type"), event["object"])


@kopf.on.probe(id="leader")
def leader(memo: kopf.Memo, **_: Any) -> bool:
    elector = memo.get("elector")
    return True if elector is None else bool(elector.is_leader)
