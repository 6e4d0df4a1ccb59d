"""`python -m kubetune_trainer.launch`: torchrun, with the exit codes of the single-process trainer.

torchrun exits 1 whenever it stops: when SIGTERM reaches it (it forwards the signal, waits for the
workers, then raises SignalException) and when its workers end non-zero. A gang that stopped because it
was preempted, every worker having checkpointed and exited 143, would then look like a crash in
`kubectl describe pod` and to anything that reads exit codes. Here:

- SIGTERM/SIGINT/SIGHUP reached torchrun: exit 128 + the signal (143 for SIGTERM), as the trainer does;
- every failed worker exited 143 (the agreed stop after one rank's SIGTERM): exit 143;
- every failed worker exited 2 (a bad setting or input, which retrying cannot fix): exit 2;
- anything else: torchrun's own error and exit code (1), unchanged.

The arguments are torchrun's (`--nnodes`, `--shutdown-timeout`, `-m kubetune_trainer`, ...).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from kubetune_trainer.outcome import EXIT_CODES

PREEMPTED = EXIT_CODES["Preempted"]


def exit_code_of_workers(codes: Iterable[int]) -> int | None:
    """The trainer's exit code that every failed worker agrees on: 143 when each stopped as preempted
    (exited 143, or was ended by SIGTERM, which torchrun reports as -15), 2 when each exited 2; None
    when they disagree or one failed for another reason (torchrun's exit 1 stands)."""
    agreed = {PREEMPTED if c == -15 else c for c in codes}
    if len(agreed) == 1 and agreed <= {PREEMPTED, EXIT_CODES["InvalidConfig"]}:
        return agreed.pop()
    return None


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        code = exit_code_of_workers(f.exitcode for f in exc.failures.values())
        if code is None:
            raise
        print(f"kubetune: every failed worker exited {code}; exiting {code}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
