"""Partitions: a node on a host of its own (a network namespace, netns.py) whose cable is
pulled while it runs sessions, then plugged back.

- Shorter than the node TTL: nothing moves, the session runs on, every byte it wrote during
  the cut is stored (sha256 equal to its own ground truth) and a follower prints it once, in
  order; a run sent meanwhile says the node is unreachable (255) instead of hanging.
- Longer than the TTL, healed soon after: the node is seen down, its daemon and its service
  replica are placed elsewhere once, its `restart=never` session is `lost` once; back on the
  bus, the returning copies are ended and their held output never lands in the new attempt.
- Longer than the fencing bound: the cut-off agent ends its daemon itself, before the link
  is back, and a run in flight is reported unreachable.

nats-server listens on our end of the veth; the controller and a second node ("home-1",
where sessions move) reach it over loopback, the cut-off node only over the veth.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from faultkit import (
    NatsFleet,
    assert_coherent,
    attempts,
    counter,
    finish,
    record,
    shells,
    tagged,
    wait_file_lines,
)
from fleet import SHOAL, Fleet, processes_with_env, wait_for
from netns import Netns, netns
from shoal import config as c

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"),
    reason="needs root, iproute2 and nsenter for a network namespace")

NODE = "part-1"
BOUND = 40.0  # seconds any one step may take: a TTL or three (self-fencing), with margin


@dataclass
class Partitioned:
    fleet: Fleet
    ns: Netns
    agent_env: dict[str, str]
    agent_log: Path

    def home_node(self) -> None:
        """A node on the bus side: where the cut-off node's sessions go."""
        self.fleet.agent("home-1", env=self.agent_env)


@contextmanager
def partitioned(tmp: Path, ttl: float) -> Iterator[Partitioned]:
    """A fleet with node ``part-1`` alone in a namespace, heartbeats every second and a node
    TTL of ``ttl``. The link is healed before anything stops (the agent stops cleanly), and
    the namespace goes last, with whatever still runs in it."""
    with netns() as ns:
        nf = NatsFleet(tmp, agents=0, host=ns.host_ip)
        nf.fleet.env.update(SHOAL_NODE_TTL=str(ttl), SHOAL_HEARTBEAT="1")
        with nf:
            fleet = nf.fleet
            cfg = tmp / "part-agent.toml"
            c.save(cfg, c.AgentConfig(address=ns.ip, state_dir=str(tmp / "part-state")))
            log_path = fleet.home / f"agent-{NODE}.log"
            with open(log_path, "w") as log:
                fleet.procs.append(subprocess.Popen(
                    ns.argv(SHOAL, "agent", "--name", NODE, "--config", str(cfg)),
                    env={**fleet.env, **nf.agent_env}, stdout=log, stderr=subprocess.STDOUT,
                    text=True, start_new_session=True))
            try:
                fleet.wait_nodes([NODE])
                yield Partitioned(fleet, ns, nf.agent_env, log_path)
            finally:
                ns.heal()


def _create(fleet: Fleet, *args: str) -> str:
    r = fleet.shoal("session", "create", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def _running_on(fleet: Fleet, sid: str, node: str) -> bool:
    r = record(fleet, sid)
    return bool(r["node"] == node and r["state"] == "running")


def _stored(fleet: Fleet, sid: str) -> bytes:
    return b"".join(data for _, data in attempts(fleet, sid))


def _in_netns(pid: int, ns: Netns) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns.name}").st_ino
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked(mark: str) -> list[int]:
    """Live processes whose environment has MARK=mark (the replicas of a service)."""
    return sorted(p.pid for p in processes_with_env("MARK", mark))


def test_cut_shorter_than_the_ttl_moves_nothing_and_loses_nothing(tmp_path: Path) -> None:
    # TTL 10 s against a ~2 s cut (and TCP's retransmission backoff after it).
    with partitioned(tmp_path, ttl=10.0) as p:
        fleet = p.fleet
        truth = tmp_path / "truth"
        sid = _create(fleet, "--restart", "on-failure", "--shell", counter(truth, 150, 0.1))
        wait_for(lambda: _running_on(fleet, sid, NODE), timeout=20)
        p.home_node()  # somewhere to move it to, were it seen lost
        with open(tmp_path / "followed", "w") as out:
            follower = fleet.spawn("logs", "-f", sid, stdout=out, stderr=subprocess.PIPE)
        wait_file_lines(truth, 20)

        p.ns.cut()
        try:
            cut_at = time.monotonic()
            written_at_cut = truth.read_text().count("\n")
            run = fleet.shoal("run", "-n", NODE, "--connect-timeout", "1", "--", "true",
                              timeout=30)
            time.sleep(max(0.0, 2.0 - (time.monotonic() - cut_at)))
            stored_in_cut = _stored(fleet, sid)
            node_in_cut = fleet.nodes()[NODE]["state"]
            written_in_cut = truth.read_text().count("\n")
        finally:
            p.ns.heal()
        healed_at = time.monotonic()
        last = f"line-{written_in_cut}\n".encode()
        wait_for(lambda: last in _stored(fleet, sid), timeout=BOUND, interval=0.1)
        print(f"cut {healed_at - cut_at:.1f}s; what was written in it stored "
              f"{time.monotonic() - healed_at:.1f}s after the heal")

        # The cut was real: a line written after it began was not stored during it.
        assert written_in_cut > written_at_cut
        assert f"line-{written_at_cut + 1}\n".encode() not in stored_in_cut
        assert node_in_cut == "ready"
        assert run.returncode == 255, (run.stdout, run.stderr)
        assert f"{NODE}: unreachable" in run.stderr, run.stderr

        rc, _, err = finish(follower, timeout=45)
        assert rc == 0, err
        written = truth.read_bytes()
        assert written.count(b"\n") == 150
        assert (tmp_path / "followed").read_bytes() == written, err
        stored = _stored(fleet, sid)
        assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(written).hexdigest()
        rec = record(fleet, sid)
        assert (rec["state"], rec["exit_code"], rec["node"], rec["attempt"], rec["restarts"]) \
            == ("exited", 0, NODE, 1, 0), rec
        assert [n for n, _ in attempts(fleet, sid)] == [1]


def test_cut_past_the_ttl_moves_each_session_once_and_fences_the_return(
        tmp_path: Path) -> None:
    # TTL 10 s: the cut-off agent, whose connection looks up, waits three TTLs before it
    # fences itself; the link is back well before, with its copies still running.
    with partitioned(tmp_path, ttl=10.0) as p:
        fleet = p.fleet
        truth = tmp_path / "truth"
        daemon = _create(fleet, "--restart", "always", "--shell", tagged(truth, quiet=False))
        single = _create(fleet, "--restart", "never", "--", "sleep", "1000")
        mark = os.urandom(4).hex()
        r = fleet.shoal("service", "create", "web", "--replicas", "1", "-e", f"MARK={mark}",
                        "--shell", f"exec {shlex.quote(sys.executable)} -m http.server $PORT")
        assert r.returncode == 0, r.stderr
        for sid in (daemon, single):
            wait_for(lambda sid=sid: _running_on(fleet, sid, NODE), timeout=20)
        [old_replica] = wait_for(lambda: len(m := _marked(mark)) == 1 and m, timeout=20)
        assert _in_netns(old_replica, p.ns)
        [old] = shells(daemon)
        [single_pid] = {q.pid for q in processes_with_env("SHOAL_SESSION_ID", single)}
        p.home_node()

        p.ns.cut()
        cut_at = time.monotonic()
        try:
            fleet.wait_nodes([NODE], state="down", timeout=BOUND)
            down_after = time.monotonic() - cut_at
            run = fleet.shoal("run", "-n", NODE, "--", "true", timeout=30)
            wait_for(lambda: _running_on(fleet, daemon, "home-1"), timeout=BOUND)
            moved_after = time.monotonic() - cut_at
            wait_for(lambda: record(fleet, single)["state"] == "lost", timeout=BOUND)
            wait_for(lambda: any(not _in_netns(q, p.ns) for q in _marked(mark)), timeout=BOUND)
            # Both copies of the daemon write now; the cut-off one's output is held.
            wait_for(lambda: len({ln.partition("-")[0] for ln in
                                  truth.read_text().splitlines()[-6:]}) == 2, timeout=BOUND)
        finally:
            p.ns.heal()
        healed_at = time.monotonic()

        assert run.returncode == 255, (run.stdout, run.stderr)
        assert f"{NODE}: unreachable" in run.stderr, run.stderr
        # Back on the bus, every returning copy is ended: one of each runs.
        wait_for(lambda: old not in shells(daemon), timeout=BOUND)
        wait_for(lambda: not _alive(single_pid), timeout=BOUND)
        wait_for(lambda: old_replica not in _marked(mark), timeout=BOUND)
        ended_after = time.monotonic() - healed_at
        fleet.wait_nodes([NODE], timeout=BOUND)
        print(f"node down {down_after:.1f}s after the cut, daemon moved after "
              f"{moved_after:.1f}s; returning copies ended {ended_after:.1f}s after the heal, "
              f"node ready {time.monotonic() - healed_at:.1f}s after it")
        time.sleep(3)  # and it stays so: nothing is placed twice, nothing comes back
        [new] = shells(daemon)
        assert not _in_netns(new, p.ns)
        [replica] = _marked(mark)
        assert not _in_netns(replica, p.ns)
        rec = record(fleet, daemon)
        assert (rec["node"], rec["state"], rec["attempt"], rec["restarts"]) \
            == ("home-1", "running", 2, 1), rec
        lost = record(fleet, single)
        assert (lost["state"], lost["attempt"]) == ("lost", 1), lost
        assert NODE in lost["reason"], lost

        r = fleet.shoal("session", "kill", "--wait", daemon)
        assert r.returncode == 0, r.stderr
        stored = attempts(fleet, daemon)
        assert [n for n, _ in stored] == [1, 2]
        assert_coherent(stored, truth)
        # Exactly two copies ever ran: the cut-off one and its one replacement.
        assert {ln.partition("-")[0] for ln in truth.read_text().splitlines()} \
            == {str(old), str(new)}
        assert "fenced" in p.agent_log.read_text(), p.agent_log.read_text()[-3000:]


def test_cut_past_the_fencing_bound_ends_the_daemon_while_cut_off(tmp_path: Path) -> None:
    with partitioned(tmp_path, ttl=4.0) as p:
        fleet = p.fleet
        truth = tmp_path / "truth"
        daemon = _create(fleet, "--restart", "always", "--shell", tagged(truth, quiet=False))
        wait_for(lambda: _running_on(fleet, daemon, NODE), timeout=20)
        [old] = shells(daemon)
        mark = os.urandom(4).hex()
        run = fleet.spawn("run", "-n", NODE, "-e", f"MARK={mark}", "--", "sleep", "300",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: _marked(mark), timeout=20)
        p.home_node()

        p.ns.cut()
        cut_at = time.monotonic()
        try:
            rc, out, err = finish(run, timeout=BOUND)
            run_after = time.monotonic() - cut_at
            wait_for(lambda: _running_on(fleet, daemon, "home-1"), timeout=BOUND)
            moved_after = time.monotonic() - cut_at
            # Still cut off, the agent ends its copy itself (it is being replaced).
            wait_for(lambda: old not in shells(daemon), timeout=BOUND)
            fenced_after = time.monotonic() - cut_at
            # And the run's process, whose controller went quiet.
            wait_for(lambda: not _marked(mark), timeout=BOUND)
            print(f"run reported {run_after:.1f}s after the cut, daemon elsewhere after "
                  f"{moved_after:.1f}s, self-fenced after {fenced_after:.1f}s, the run's "
                  f"process ended after {time.monotonic() - cut_at:.1f}s")
        finally:
            p.ns.heal()

        assert rc == 255, (out, err)
        assert f"{NODE}: unreachable" in err, err
        fleet.wait_nodes([NODE], timeout=BOUND)
        time.sleep(2)  # back on the bus: nothing is placed again
        [new] = shells(daemon)
        assert not _in_netns(new, p.ns)
        rec = record(fleet, daemon)
        assert (rec["node"], rec["state"], rec["attempt"], rec["restarts"]) \
            == ("home-1", "running", 2, 1), rec
        r = fleet.shoal("session", "kill", "--wait", daemon)
        assert r.returncode == 0, r.stderr
        stored = attempts(fleet, daemon)
        assert [n for n, _ in stored] == [1, 2]
        assert_coherent(stored, truth)
        assert "self-fencing" in p.agent_log.read_text(), p.agent_log.read_text()[-3000:]

