"""The stop request: SIGTERM or SIGINT set one flag that the loop polls at every step boundary.

Installed first thing in `main()`, before torch, timm or the data are loaded, so a signal that arrives
during start-up still ends in a checkpoint (if any work was done), exit 143 and a termination message
instead of the default action (death with no message). Standard library only.
"""

from __future__ import annotations

import signal
import threading

STOP = threading.Event()
"""Set by the handler; the loop checks it (all-reduced across ranks) after every step."""
_received: list[str] = []


def _handler(signum: int, _frame: object) -> None:
    if not _received:
        _received.append(signal.Signals(signum).name)
    STOP.set()


def install() -> None:
    """SIGTERM and SIGINT only request a stop: the step in progress finishes and is checkpointed."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _handler)


def signal_name() -> str:
    """The first stop signal received (`SIGTERM`, `SIGINT`), or `SIGTERM` when another rank asked."""
    return _received[0] if _received else "SIGTERM"
