"""kubetune_trainer.launch: torchrun with the trainer's exit codes (143 preempted, 2 bad config)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune_trainer.launch import exit_code_of_workers


@pytest.mark.unit
@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([143, 143], 143),  # the agreed stop: every rank checkpointed
        ([143, -15], 143),  # one rank ended by the forwarded SIGTERM
        ([2], 2),  # a bad setting: retrying cannot help
        ([2, 2], 2),
        ([143, 1], None),  # one rank crashed: torchrun's exit 1 stands
        ([143, 2], None),
        ([1], None),
        ([-9], None),  # SIGKILL: not a clean stop
        ([], None),
    ],
)
def test_exit_code_the_failed_workers_agree_on(codes: list[int], expected: int | None) -> None:
    assert exit_code_of_workers(codes) == expected


def launch(script: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "kubetune_trainer.launch", "--nproc-per-node", "2", "--master-port", "0",
            "--standalone", *extra, str(script)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.trainer
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("body", "code"), [("sys.exit(143)", 143), ("sys.exit(2)", 2), ("sys.exit(3)", 1)])
def test_workers_exit_codes_become_the_launchers(tmp_path: Path, body: str, code: int) -> None:
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\n{body}\n")
    proc = launch(script)
    out, _ = proc.communicate(timeout=100)
    assert proc.returncode == code, out


@pytest.mark.trainer
@pytest.mark.timeout(120)
def test_sigterm_to_the_launcher_exits_143(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "print('ready', flush=True)\n"
        "time.sleep(100)\n"
    )
    proc = launch(script)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = 0
    while seen < 2 and time.monotonic() < deadline:  # both workers started (they print "ready")
        seen += "ready" in proc.stdout.readline()
    assert seen == 2, "workers did not start"
    proc.send_signal(signal.SIGTERM)  # as the kubelet does: to PID 1's child, torchrun
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out
