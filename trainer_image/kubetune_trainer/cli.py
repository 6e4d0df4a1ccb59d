"""`kubetune-train`: parse the job, build the trainer, run it, report how it ended (exit code + termination log)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from kubetune_trainer import stop
from kubetune_trainer.config import ConfigError, load_job
from kubetune_trainer.outcome import EXIT_CODES, Outcome

__all__ = ["EXIT_CODES", "main"]

log = logging.getLogger("kubetune_trainer")


def termination_log_path() -> Path | None:
    """$KUBETUNE_TERMINATION_LOG when set, else /dev/termination-log when writable."""
    if os.environ.get("KUBETUNE_TERMINATION_LOG"):
        return Path(os.environ["KUBETUNE_TERMINATION_LOG"])
    dev = Path("/dev/termination-log")
    return dev if dev.exists() and os.access(dev, os.W_OK) else None


def report(outcome: dict[str, object], rank: int, local_rank: int) -> None:
    """One JSON line to the termination log (local rank 0 owns the pod's file) and to stderr."""
    line = json.dumps(outcome, sort_keys=False)
    path = termination_log_path()
    if path is not None and local_rank > 0:
        path = path.with_name(f"{path.name}.rank{rank}")  # other processes of the same pod or machine
    if path is not None:
        try:
            path.write_text(line + "\n")
        except OSError as e:
            log.warning("cannot write termination log %s: %s", path, e)
    print(line, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="kubetune-train", description="Fine-tune a timm model from a FineTuneJob spec."
    )
    p.add_argument("-f", "--file", required=True, help="FineTuneJob manifest or bare spec (YAML)")
    p.add_argument(
        "--checkpoint-dir", default=None, help="default $KUBETUNE_CHECKPOINT_DIR or ./runs/<name>/"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument(
        "--log-every-seconds",
        type=_non_negative,
        default=30.0,
        metavar="S",
        help="progress line interval when stderr is not a terminal (default 30; 0 = off); "
        "a terminal gets a live progress bar",
    )
    return p.parse_args(argv)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    # First of all, before torch is imported: SIGTERM and Ctrl-C only raise a flag, and the loop finishes
    # the step, checkpoints and exits 143 (during start-up too, with a termination message).
    stop.install()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from kubetune_trainer import loop  # after argparse, so --help stays fast

    outcome = Outcome("Error", 1)
    trainer = None
    rt = None
    try:
        cfg = load_job(args.file, args.overrides)
        root = Path(
            args.checkpoint_dir or os.environ.get("KUBETUNE_CHECKPOINT_DIR") or Path("runs") / cfg.name
        )
        rt = loop.init_runtime()
        trainer = loop.Trainer(cfg, root, rt, args.log_every_seconds)
        outcome = trainer.run()
    except ConfigError as e:
        outcome = Outcome("InvalidConfig", 2, message=str(e))
        log.error("invalid job: %s", e)
    except Exception as e:
        outcome = Outcome("Error", 1, message=f"{type(e).__name__}: {e}")
        log.error("training failed: %s\n%s", e, traceback.format_exc())
    if trainer is not None:
        outcome.step, outcome.total_steps = (
            outcome.step or trainer.step,
            outcome.total_steps or trainer.total_steps,
        )
        outcome.epoch = outcome.epoch or trainer.epoch
        outcome.checkpoint = outcome.checkpoint or trainer.checkpoint_path
        outcome.checkpoint_step = outcome.checkpoint_step or trainer.checkpoint_step
        outcome.lost_steps = trainer.lost_steps_total
        outcome.bad_images = trainer.data.bad_images()
        trainer.close(outcome.exit_code)
    report(
        outcome.termination_doc(),
        rt.rank if rt else 0,
        rt.local_rank if rt else 0,
    )
    loop.shutdown_runtime(rt)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
