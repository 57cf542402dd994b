"""Split brain: an agent SIGKILLed under a silent daemon, and an agent SIGSTOPped past the
node TTL and then continued. The session keeps its own ground truth (each line, tagged with
the writing shell's pid, goes to a local file as well as to its output), and the case checks
that after the fencing bound one copy at most still runs, and that the stored output is one
coherent piece per attempt: the lines of one pid only, in order, none doubled."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from faultkit import assert_coherent, attempts, record, shells, tagged
from fleet import Fleet, wait_for

BOUND = 30.0  # seconds after the fault by which one copy at most runs (TTL 6 s + margin)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "home", agents=0).start()
    try:
        yield f
    finally:
        f.stop()


def _create(fleet: Fleet, script: str) -> str:
    r = fleet.shoal("session", "create", "--restart", "always", "--shell", script)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_agent_sigkill_under_a_silent_daemon_leaves_one_copy(fleet: Fleet,
                                                             tmp_path: Path) -> None:
    """The finding: the orphan and the rescheduled copy ran side by side until the agent
    restarted, with no upper bound."""
    a = fleet.agent("fence-a")
    truth = tmp_path / "truth"
    sid = _create(fleet, tagged(truth, quiet=True))
    wait_for(lambda: record(fleet, sid)["state"] == "running")
    first = wait_for(lambda: shells(sid))
    fleet.agent("fence-b")
    a.send_signal(signal.SIGKILL)
    a.wait()
    killed_at = time.monotonic()
    moved = wait_for(lambda: (r := record(fleet, sid))["node"] == "fence-b"
                     and r["state"] == "running" and r, timeout=BOUND)
    assert moved["attempt"] == 2
    wait_for(lambda: len(shells(sid)) == 1 and not (shells(sid) & first),
             timeout=max(1.0, BOUND - (time.monotonic() - killed_at)))
    # Ground truth: in the last second, only one shell wrote.
    time.sleep(1.5)
    tail = truth.read_text().splitlines()[-10:]
    assert len({line.partition("-")[0] for line in tail}) == 1, tail


def test_agent_sigstop_past_the_ttl_is_fenced(fleet: Fleet, tmp_path: Path) -> None:
    """The finding: two copies ran until the stopped agent reconciled, and the stored
    output was spliced from both (lines of the old pid, then the new, then the old)."""
    _sigstop_past_the_ttl(fleet, tmp_path, fleet.agent)


def test_agent_sigstop_past_the_ttl_is_fenced_with_node_identities(tmp_path: Path) -> None:
    """The same across node credentials: each node stores output under its own name, and
    the stopped one learns from the controllers (it may not read the stream) that a newer
    attempt writes."""
    f = Fleet(tmp_path / "home", agents=0, extra_args=("--node-identities",)).start()
    try:
        r = f.shoal("token", "create", "--join", "--uses", "2", "--expires", "10m")
        assert r.returncode == 0, r.stderr
        token = r.stdout.strip()
        _sigstop_past_the_ttl(f, tmp_path, lambda name: f.agent(name, "--join", f.url,
                                                                "--token", token))
    finally:
        f.stop()


def _sigstop_past_the_ttl(fleet: Fleet, tmp_path: Path,
                          agent: Callable[[str], subprocess.Popen[str]]) -> None:
    a = agent("fence-a")
    truth = tmp_path / "truth"
    sid = _create(fleet, tagged(truth, quiet=False))
    wait_for(lambda: record(fleet, sid)["state"] == "running")
    old = wait_for(lambda: shells(sid))
    agent("fence-b")
    a.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: (r := record(fleet, sid))["node"] == "fence-b"
                 and r["state"] == "running", timeout=BOUND)
        time.sleep(2)  # both copies write: the old one's output piles up in the stopped agent
    finally:
        a.send_signal(signal.SIGCONT)
    continued_at = time.monotonic()
    wait_for(lambda: not (shells(sid) & old), timeout=BOUND)
    assert time.monotonic() - continued_at < BOUND
    assert len(shells(sid)) == 1
    rec = record(fleet, sid)
    assert (rec["node"], rec["attempt"], rec["state"]) == ("fence-b", 2, "running")
    time.sleep(1)  # the zombie's held output had its chance to splice
    r = fleet.shoal("session", "kill", "--wait", sid)
    assert r.returncode == 0, r.stderr
    stored = attempts(fleet, sid)
    assert [n for n, _ in stored] == [1, 2]
    assert_coherent(stored, truth)
    log = (fleet.home / "agent-fence-a.log").read_text()
    assert "fenced" in log, log[-2000:]
