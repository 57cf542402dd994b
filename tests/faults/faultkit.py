"""Shared pieces of the fault suite: sessions that keep their own ground truth, and a fleet
on a NATS server the test can kill.

A ground-truth session appends every line it writes to a local file as well as to its
output, so a case compares what a client printed with what the session really wrote, byte
for byte: nothing lost, doubled or reordered.
"""

from __future__ import annotations

import base64
import json
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fleet import Fleet, processes_with_env
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

    def __init__(self, tmp: Path, agents: int = 1, host: str = "127.0.0.1") -> None:
        self.users = NatsUsers.generate()
        self.server = NatsServer(tmp / "nats", self.users, host=host, port=free_port(host))
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

    @property
    def agent_env(self) -> dict[str, str]:
        """What an agent joining this fleet needs (the fleet's own env has the controller's
        credentials)."""
        return {"SHOAL_NATS_URL": self.server.url, "SHOAL_NATS_USER": "agent",
                "SHOAL_NATS_PASSWORD": self.users.agent_password}

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


def tagged(truth: Path, quiet: bool) -> str:
    """A daemon script that appends ``<pid>-<n>`` to ``truth`` (and, unless
    ``quiet``, to its output) every 0.1 s."""
    f = shlex.quote(str(truth))
    out = "" if quiet else " echo $$-$i;"
    return f"i=1; while :; do echo $$-$i >> {f};{out} i=$((i+1)); sleep 0.1; done"


def api(fleet: Fleet, path: str) -> bytes:
    req = urllib.request.Request(fleet.url + path,
                                 headers={"Authorization": f"Bearer {fleet.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def record(fleet: Fleet, sid: str) -> dict[str, Any]:
    return dict(json.loads(api(fleet, f"/api/v1/sessions/{sid}")))


def shells(sid: str) -> set[int]:
    """Pids of the session's shells still running (its sleeps share the environment)."""
    return {p.pid for p in processes_with_env("SHOAL_SESSION_ID", sid)
            if p.info["name"] == "sh"}


def attempts(fleet: Fleet, sid: str) -> list[tuple[int, bytes]]:
    """The stored output, split at the attempt markers: [(attempt, bytes)]."""
    out: list[tuple[int, bytes]] = []
    for line in api(fleet, f"/api/v1/sessions/{sid}/logs?attempts=1").splitlines():
        frame = json.loads(line)
        if frame["t"] == "attempt":
            out.append((frame["attempt"], b""))
        elif frame["t"] == "out":
            assert out, "output before any attempt marker"
            n, data = out[-1]
            out[-1] = (n, data + base64.b64decode(frame["data"]))
    return out


def assert_coherent(stored: list[tuple[int, bytes]], truth: Path) -> None:
    """Each attempt of ``stored`` is one coherent piece of the ground truth ``truth`` (lines
    ``<pid>-<n>``): a pid's lines in one attempt only, in order, none lost or doubled, and no
    attempt ends in a cut line."""
    numbers = [n for n, _ in stored]
    assert numbers == sorted(set(numbers)), f"attempts out of order: {numbers}"
    written: dict[str, list[str]] = {}
    for line in truth.read_text().splitlines():
        pid, _, _ = line.partition("-")
        written.setdefault(pid, []).append(line)
    seen_pids: set[str] = set()
    for n, data in stored:
        lines = data.decode().splitlines()
        if not lines:
            continue
        assert data.endswith(b"\n"), f"attempt {n} ends in a cut line: {data[-40:]!r}"
        pids = {line.partition("-")[0] for line in lines}
        strange = [line for line in lines if line.partition("-")[0] not in written]
        assert not strange, f"attempt {n} holds lines no copy wrote (spliced): {strange[:3]}"
        # One attempt may hold several pids (restarts on one node) but never interleaved.
        for pid in pids:
            mine = [line for line in lines if line.startswith(pid + "-")]
            assert pid not in seen_pids, f"pid {pid} writes in two attempts: spliced"
            assert mine == written[pid][:len(mine)], f"attempt {n}, pid {pid}: lost or reordered"
        seen_pids |= pids
