"""Small helpers for child processes: time one run with a timeout, stop a daemon whole."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class RunResult:
    """Outcome of one timed run of a command."""

    ok: bool
    seconds: float
    returncode: int | None
    error: str = ""


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def timed_run(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    cwd: str | None = None,
) -> RunResult:
    """Run argv once as a new process, stdout to /dev/null; wall time from spawn to exit.

    A run that exits non-zero or outlives `timeout` (its whole process group is then killed)
    is a failure; the tail of its stderr is kept for the report.
    """
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        # A blocking wait is exact; Popen.wait(timeout=...) polls in steps of up to 50 ms.
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            _kill_group(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            rc: int | None = proc.wait()
            seconds = time.perf_counter() - start
            if timed_out.is_set():
                rc = None
        finally:
            timer.cancel()
            # A timed-out run, and any leftover children of a finished one, must not linger.
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
        err.seek(0)
        tail = err.read()[-2000:].decode(errors="replace").strip()
    if rc is None:
        return RunResult(False, seconds, None, f"timeout after {timeout:.0f}s; {tail}"[:500])
    if rc != 0:
        return RunResult(False, seconds, rc, f"exit {rc}; {tail}"[-500:])
    return RunResult(True, seconds, rc)


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 15.0) -> None:
    """SIGTERM a daemon started in its own session, wait, then SIGKILL its whole group."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    _kill_group(proc.pid, signal.SIGKILL)
