"""Shared pieces of the fault suite: sessions that keep their own ground truth, and a fleet
on a NATS server the test can kill.

A ground-truth session appends every line it writes to a local file as well as to its
output, so a case compares what a client printed with what the session really wrote, byte
for byte: nothing lost, doubled or reordered.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from fleet import Fleet
from shoal.natsio.natsd import NatsServer, NatsUsers, free_port


def counter(truth: Path, lines: int, every: float, tag: str = "line") -> str:
    """A shell script writing ``tag-1`` .. ``tag-N``, one each ``every`` seconds, to its
    output and to ``truth``."""
    f = shlex.quote(str(truth))
    return (f"i=1; while [ $i -le {lines} ]; do echo {tag}-$i >> {f}; echo {tag}-$i; "
            f"i=$((i+1)); sleep {every}; done")


def health(url: str) -> int:
    try:
        return int(urllib.request.urlopen(url + "/healthz", timeout=5).status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


class NatsFleet:
    """A fleet whose nats-server is the test's own child, so a case can SIGKILL it and
    start it again on the same port and store."""

    def __init__(self, tmp: Path, agents: int = 1) -> None:
        self.users = NatsUsers.generate()
        self.server = NatsServer(tmp / "nats", self.users, port=free_port())
        self.fleet = Fleet(tmp / "home", agents=agents, extra_args=("--nats", self.server.url))
        self.fleet.env.update(SHOAL_NATS_USER="controller",
                              SHOAL_NATS_PASSWORD=self.users.controller_password)

    def __enter__(self) -> NatsFleet:
        self.server.start()
        try:
            self.fleet.start()
        except BaseException:
            self.server.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.fleet.stop()
        finally:
            self.server.stop()

    def kill_nats(self) -> None:
        assert self.server.proc is not None
        self.server.proc.send_signal(signal.SIGKILL)
        self.server.proc.wait()


def finish(p: subprocess.Popen[str], timeout: float = 45) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def wait_file_lines(path: Path, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never had {n} lines")
