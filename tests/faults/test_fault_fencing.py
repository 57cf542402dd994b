"""Split brain: an agent SIGKILLed under a silent daemon, and an agent SIGSTOPped past the
node TTL and then continued. The session keeps its own ground truth (each line, tagged with
the writing shell's pid, goes to a local file as well as to its output), and the case checks
that after the fencing bound one copy at most still runs, and that the stored output is one
coherent piece per attempt: the lines of one pid only, in order, none doubled."""

from __future__ import annotations

import json
import shlex
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import Fleet, processes_with_env, wait_for

BOUND = 30.0  # seconds after the fault by which one copy at most runs (TTL 6 s + margin)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "home", agents=0).start()
    try:
        yield f
    finally:
        f.stop()


def _daemon(truth: Path, quiet: bool) -> str:
    """A restart=always daemon that appends ``<pid>-<n>`` to ``truth`` (and, unless
    ``quiet``, to its output) every 0.1 s."""
    f = shlex.quote(str(truth))
    out = "" if quiet else " echo $$-$i;"
    return f"i=1; while :; do echo $$-$i >> {f};{out} i=$((i+1)); sleep 0.1; done"


def _api(fleet: Fleet, path: str) -> bytes:
    req = urllib.request.Request(fleet.url + path,
                                 headers={"Authorization": f"Bearer {fleet.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def _record(fleet: Fleet, sid: str) -> dict[str, Any]:
    return dict(json.loads(_api(fleet, f"/api/v1/sessions/{sid}")))


def _copies(sid: str) -> set[int]:
    """Pids of the session's shells still running (its sleeps share the environment)."""
    return {p.pid for p in processes_with_env("SHOAL_SESSION_ID", sid)
            if p.info["name"] == "sh"}


def _create(fleet: Fleet, script: str) -> str:
    r = fleet.shoal("session", "create", "--restart", "always", "--shell", script)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _attempts(fleet: Fleet, sid: str) -> list[tuple[int, bytes]]:
    """The stored output, split at the attempt markers: [(attempt, bytes)]."""
    out: list[tuple[int, bytes]] = []
    import base64
    for line in _api(fleet, f"/api/v1/sessions/{sid}/logs?attempts=1").splitlines():
        frame = json.loads(line)
        if frame["t"] == "attempt":
            out.append((frame["attempt"], b""))
        elif frame["t"] == "out":
            assert out, "output before any attempt marker"
            n, data = out[-1]
            out[-1] = (n, data + base64.b64decode(frame["data"]))
    return out


def _assert_coherent(attempts: list[tuple[int, bytes]], truth: Path) -> None:
    numbers = [n for n, _ in attempts]
    assert numbers == sorted(set(numbers)), f"attempts out of order: {numbers}"
    written: dict[str, list[str]] = {}
    for line in truth.read_text().splitlines():
        pid, _, _ = line.partition("-")
        written.setdefault(pid, []).append(line)
    seen_pids = set()
    for n, data in attempts:
        lines = data.decode().splitlines()
        if not lines:
            continue
        assert data.endswith(b"\n"), f"attempt {n} ends in a cut line: {data[-40:]!r}"
        pids = {line.partition("-")[0] for line in lines}
        # One attempt may hold several pids (restarts on one node) but never interleaved.
        for pid in pids:
            mine = [line for line in lines if line.startswith(pid + "-")]
            assert pid not in seen_pids, f"pid {pid} writes in two attempts: spliced"
            assert mine == written[pid][:len(mine)], f"attempt {n}, pid {pid}: lost or reordered"
        seen_pids |= pids


def test_agent_sigkill_under_a_silent_daemon_leaves_one_copy(fleet: Fleet,
                                                             tmp_path: Path) -> None:
    """The finding: the orphan and the rescheduled copy ran side by side until the agent
    restarted, with no upper bound."""
    a = fleet.agent("fence-a")
    truth = tmp_path / "truth"
    sid = _create(fleet, _daemon(truth, quiet=True))
    wait_for(lambda: _record(fleet, sid)["state"] == "running")
    first = wait_for(lambda: _copies(sid))
    fleet.agent("fence-b")
    a.send_signal(signal.SIGKILL)
    a.wait()
    killed_at = time.monotonic()
    moved = wait_for(lambda: (r := _record(fleet, sid))["node"] == "fence-b"
                     and r["state"] == "running" and r, timeout=BOUND)
    assert moved["attempt"] == 2
    wait_for(lambda: len(_copies(sid)) == 1 and not (_copies(sid) & first),
             timeout=max(1.0, BOUND - (time.monotonic() - killed_at)))
    # Ground truth: in the last second, only one shell wrote.
    time.sleep(1.5)
    tail = truth.read_text().splitlines()[-10:]
    assert len({line.partition("-")[0] for line in tail}) == 1, tail


def test_agent_sigstop_past_the_ttl_is_fenced(fleet: Fleet, tmp_path: Path) -> None:
    """The finding: two copies ran until the stopped agent reconciled, and the stored
    output was spliced from both (lines of the old pid, then the new, then the old)."""
    a = fleet.agent("fence-a")
    truth = tmp_path / "truth"
    sid = _create(fleet, _daemon(truth, quiet=False))
    wait_for(lambda: _record(fleet, sid)["state"] == "running")
    old = wait_for(lambda: _copies(sid))
    fleet.agent("fence-b")
    a.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: (r := _record(fleet, sid))["node"] == "fence-b"
                 and r["state"] == "running", timeout=BOUND)
        time.sleep(2)  # both copies write: the old one's output piles up in the stopped agent
    finally:
        a.send_signal(signal.SIGCONT)
    continued_at = time.monotonic()
    wait_for(lambda: not (_copies(sid) & old), timeout=BOUND)
    assert time.monotonic() - continued_at < BOUND
    assert len(_copies(sid)) == 1
    record = _record(fleet, sid)
    assert (record["node"], record["attempt"], record["state"]) == ("fence-b", 2, "running")
    time.sleep(1)  # the zombie's held output had its chance to splice
    r = fleet.shoal("session", "kill", "--wait", sid)
    assert r.returncode == 0, r.stderr
    attempts = _attempts(fleet, sid)
    assert [n for n, _ in attempts] == [1, 2]
    _assert_coherent(attempts, truth)
    log = (fleet.home / "agent-fence-a.log").read_text()
    assert "fenced" in log, log[-2000:]
