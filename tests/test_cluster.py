"""shoal on a 3-server NATS cluster (``shoal up --nats-cluster 3``): losing a server loses
nothing. The server killed (SIGKILL) is at once the JetStream meta leader and the leader of
the output stream and of the sessions bucket, while sessions write output, a follower reads
it live and a run is in flight."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from fleet import Fleet, wait_for, wait_running
from shoal.client.aio import Client, LogChunk, controller_urls
from shoal.config import ControllerConfig, NatsConfig, load
from shoal.errors import ConnectError
from shoal.natsio import bus
from shoal.natsio.natsd import ClusterSpec, NatsCluster, NatsUsers
from shoal.natsio.outputlog import STREAM as OUTPUT_STREAM
from shoal.wire import messages as m
from shoal.wire import servicetypes as st
from shoal.wire.subjects import SESSIONS_BUCKET

LINES = 500  # per counter session: about 15 s of output, so the fault lands mid-stream
SESSIONS_STREAM = f"KV_{SESSIONS_BUCKET}"


class Jet:
    """The JetStream API of the fleet's cluster, with the controller's credentials."""

    def __init__(self, home: Path) -> None:
        self.cfg = load(ControllerConfig, home / "controller.toml").nats

    def api(self, subject: str, body: Any = None) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            nc = await bus.connect(self.cfg, "test-cluster")
            try:
                payload = b"" if body is None else json.dumps(body).encode()
                reply = await nc.request(subject, payload, timeout=5)
                out: dict[str, Any] = json.loads(reply.data)
                return out
            finally:
                await bus.close(nc)

        return asyncio.run(go())

    def cluster(self, stream: str) -> dict[str, Any]:
        info = self.api(f"$JS.API.STREAM.INFO.{stream}")
        assert "error" not in info, info
        return dict(info["cluster"])

    def leader(self, stream: str) -> str:
        return str(self.cluster(stream).get("leader") or "")

    def move_leader(self, stream: str, to: str) -> None:
        """Ask the stream's leader to step down in favour of ``to`` until ``to`` leads."""
        def moved() -> bool:
            if self.leader(stream) == to:
                return True
            self.api(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", {"placement": {"preferred": to}})
            time.sleep(0.5)
            return self.leader(stream) == to

        wait_for(moved, timeout=30, interval=0.5)

    def all_current(self, stream: str) -> bool:
        c = self.cluster(stream)
        peers = c.get("replicas") or []
        return bool(c.get("leader")) and len(peers) == 2 and all(p.get("current") and
                                                                  not p.get("offline")
                                                                  for p in peers)


def meta_leader(home: Path) -> str:
    """The JetStream meta leader, from the servers' own logs: its election is the newest
    "metadata leader" line, which names it ("Self is ..." in its own log)."""
    events = []
    for log in sorted((home / "nats-cluster").glob("n*/nats.log")):
        me = log.parent.name
        for line in log.read_text().splitlines():
            stamp = line[line.find("]") + 2:line.find("]") + 28]
            if "Self is new JetStream cluster metadata leader" in line:
                events.append((stamp, me))
            elif (found := re.search(r"new metadata leader: (\w+)/", line)):
                events.append((stamp, found.group(1)))
    assert events, "no meta leader elected"
    return max(events)[1]


def server_process(home: Path, name: str) -> psutil.Process:
    conf = str(home / "nats-cluster" / name / "nats.conf")
    for p in psutil.process_iter(["cmdline"]):
        if conf in (p.info["cmdline"] or []):
            return p
    raise AssertionError(f"no nats-server {name}")


def counter(truth: Path, n: int = LINES) -> str:
    """Print line-1..line-n, each also appended to ``truth``: what was really written."""
    return (f"i=1; while [ $i -le {n} ]; do echo line-$i; echo line-$i >> {truth}; "
            "i=$((i+1)); sleep 0.02; done")


def session_state(fleet: Fleet, sid: str) -> dict[str, Any]:
    r = fleet.shoal("session", "show", sid)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


@pytest.mark.timeout(90)
def test_losing_the_leading_server_loses_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    fleet = Fleet(home, agents=3, extra_args=("--nats-cluster", "3"))
    follower: subprocess.Popen[str] | None = None
    try:
        fleet.start(timeout=60)
        up_log = fleet.log.read_text()
        assert re.search(r"NATS cluster 'shoal' of 3 servers, 3 replicas", up_log), up_log
        for name in ("n1", "n2", "n3"):
            assert re.search(rf"{name}: NATS nats://127\.0\.0\.1:\d+ +controller http://", up_log)
        client = tomllib.loads((home / "client.toml").read_text())
        assert len(client["url"].split(",")) == 3  # every controller, for fail-over
        agent = tomllib.loads((home / "agent.toml").read_text())
        assert len(agent["nats"]["url"].split(",")) == 3  # every server

        jet = Jet(home)
        # Every bucket (the identities' two too) and the output stream: 3 replicas, untold.
        report = fleet.shoal("admin", "upgrade-replicas", "--dry-run")
        assert report.returncode == 0, report.stderr
        assert "0 of 13 below 3 (cluster of 3)" in report.stdout, report.stdout

        # One server leads everything: the meta group, the output stream, the sessions.
        victim = meta_leader(home)
        jet.move_leader(OUTPUT_STREAM, victim)
        jet.move_leader(SESSIONS_STREAM, victim)
        assert meta_leader(home) == victim

        truths = {n: tmp_path / f"truth-{n}.txt" for n in ("node-1", "node-2", "node-3")}
        sids = {}
        for node, truth in truths.items():
            r = fleet.shoal("session", "create", "--node", node, "--shell", counter(truth))
            assert r.returncode == 0, r.stderr
            sids[node] = r.stdout.strip()
        followed = tmp_path / "followed.txt"
        with open(followed, "w") as out:
            follower = fleet.spawn("logs", "-f", sids["node-1"], stdout=out,
                                   stderr=subprocess.PIPE)
        run = fleet.spawn("run", "--all", "--", "sh", "-c", "sleep 3; echo run-done",
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: all(t.exists() and t.read_text().count("\n") >= 50
                             for t in truths.values()), timeout=30)

        server_process(home, victim).send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        # New runs and sessions succeed within a few seconds.
        def a_run_works() -> bool:
            r = fleet.shoal("run", "--all", "--", "echo", "after", timeout=20)
            return r.returncode == 0 and sorted(r.stdout.split()) == [
                "after", "after", "after", "node-1:", "node-2:", "node-3:"]

        wait_for(a_run_works, timeout=20, interval=0.2)
        r = fleet.shoal("session", "create", "--", "echo", "new-session")
        assert r.returncode == 0, r.stderr
        fresh = r.stdout.strip()
        wait_for(lambda: fleet.shoal("logs", fresh).stdout == "new-session\n", timeout=20)
        recovered = time.monotonic() - killed_at

        # The run that was in flight ends, and every node answered it.
        out, err = run.communicate(timeout=30)
        print(f"in-flight run: status {run.returncode}; {err.strip()}")
        assert sorted(out.split()) == ["node-1:", "node-2:", "node-3:",
                                       "run-done", "run-done", "run-done"], (out, err)

        # The sessions kept running: each ends, once, with exit 0.
        def all_exited() -> bool:
            return all(session_state(fleet, s)["state"] == "exited" for s in sids.values())

        try:
            wait_for(all_exited, timeout=60, interval=0.5)
        except AssertionError:
            states = [(s["node"], s["state"], s["reason"])
                      for s in json.loads(fleet.shoal("session", "list", "--json").stdout)]
            raise AssertionError(f"sessions did not all exit: {states}") from None
        expected = [f"line-{i}" for i in range(1, LINES + 1)]
        for node, sid in sids.items():
            record = session_state(fleet, sid)
            assert record["exit_code"] == 0 and record["node"] == node, record
            written = truths[node].read_bytes()
            assert written.decode().split() == expected  # the process ran once, to the end
            r = fleet.shoal("logs", sid)
            assert r.returncode == 0, r.stderr
            stored = r.stdout.encode()
            assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(written).hexdigest(), \
                f"{node}: stored output differs from what was written"
            assert stored.decode().split() == expected  # contiguous: no loss, no double

        # The follower saw every byte that was written, in order, once, and ended with the
        # session: a follower never drops, nor ends early, across the loss of a server.
        status = follower.wait(30)
        complaint = follower.stderr.read() if follower.stderr else ""
        seen = followed.read_bytes()
        assert (status, complaint) == (0, ""), f"after {len(seen)} bytes: {complaint}"
        assert seen == truths["node-1"].read_bytes()

        # No session lost or duplicated.
        # (Each controller's cache follows the bucket; after a leader loss its watch can take
        # nats-py's ~10 s to resume: the listing converges within that bound.)
        want = sorted([*sids.values(), fresh])

        def listed_ids() -> list[str]:
            listed = json.loads(fleet.shoal("session", "list", "--json").stdout)
            return sorted(s["id"] for s in listed)

        wait_for(lambda: listed_ids() == want, timeout=30)
        listed = json.loads(fleet.shoal("session", "list", "--json").stdout)
        assert not [s for s in listed if s["state"] in ("lost", "failed")]

        # The killed server came back and caught up.
        wait_for(lambda: f"nats-server {victim} is back" in fleet.log.read_text(), timeout=30)
        wait_for(lambda: jet.all_current(OUTPUT_STREAM) and jet.all_current(SESSIONS_STREAM),
                 timeout=30, interval=0.5)
        print(f"killed {victim} (meta, output and sessions leader); a new run and session "
              f"worked {recovered:.1f}s later")
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
        fleet.stop()


@pytest.mark.timeout(90)
def test_a_fleet_with_fewer_replicas_is_told_and_upgraded(tmp_path: Path) -> None:
    """Buckets made with one replica (an old fleet, or ``replicas = 1``) on a cluster: the
    next start says so, and ``shoal admin upgrade-replicas`` raises them live."""
    home = tmp_path / "home"
    old = Fleet(home, agents=1, extra_args=("--nats-cluster", "3"))
    old.env["SHOAL_REPLICAS"] = "1"
    try:
        old.start(timeout=60)
        assert "1 replicas per bucket and stream" in old.log.read_text()
        sid = old.shoal("session", "create", "--", "echo", "kept").stdout.strip()
        wait_for(lambda: old.shoal("logs", sid).stdout == "kept\n", timeout=20)
    finally:
        old.stop()

    fleet = Fleet(home, agents=1, extra_args=("--nats-cluster", "3"))
    try:
        fleet.start(timeout=60)
        text = fleet.log.read_text()
        assert re.search(r"note: the NATS cluster has 3 servers and allows 3 replicas, but "
                         r".*KV_shoal-sessions \(R1\).*shoal-output \(R1\).*"
                         r"shoal admin upgrade-replicas", text), text
        dry = fleet.shoal("admin", "upgrade-replicas", "--dry-run")
        assert dry.returncode == 0 and "13 of 13 below 3" in dry.stdout, dry.stdout + dry.stderr
        up = fleet.shoal("admin", "upgrade-replicas")
        assert up.returncode == 0, up.stderr
        assert "raised shoal-output: 1 -> 3" in up.stdout
        assert "raised KV_shoal-sessions: 1 -> 3" in up.stdout
        after = fleet.shoal("admin", "upgrade-replicas", "--dry-run")
        assert "0 of 13 below 3" in after.stdout, after.stdout
        jet = Jet(home)
        assert jet.all_current(OUTPUT_STREAM) and jet.all_current(SESSIONS_STREAM)
        # The data came along, and the fleet works on.
        assert fleet.shoal("logs", sid).stdout == "kept\n"
        r = fleet.shoal("run", "--all", "--", "echo", "ok")
        assert r.returncode == 0 and r.stdout == "node-1: ok\n", r.stderr
        # Asking for more replicas than there are servers is refused, changing nothing.
        bad = fleet.shoal("admin", "upgrade-replicas", "--replicas", "5")
        assert bad.returncode == 2 and "--replicas 3 or fewer" in bad.stderr
    finally:
        fleet.stop()


def _route_handshake(port: int, user: str | None, password: str | None) -> bytes:
    """Speak the route protocol to a server's cluster port as another server would."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.makefile("rb").readline()  # the server's INFO
        hello: dict[str, Any] = {"verbose": False, "pedantic": False, "name": "rogue",
                                 "cluster": "shoal", "headers": True}
        if user is not None:
            hello.update(user=user, **{"pass": password})
        s.sendall(b"CONNECT " + json.dumps(hello).encode() + b"\r\nPING\r\n")
        s.settimeout(5)
        reply = b""
        while b"\n" not in reply:
            data = s.recv(4096)
            if not data:
                break
            reply += data
        return reply


def test_cluster_routes_refuse_a_server_without_the_route_password(tmp_path: Path) -> None:
    """A local user who reaches a route port cannot join the cluster (and so read every
    account's messages and streams) without the generated route password."""
    users = NatsUsers.generate()
    cluster = NatsCluster(tmp_path / "nats", users, ClusterSpec.allocate(2))
    cluster.start()
    try:
        port = cluster.spec.peers[0].route_port
        assert b"Authorization Violation" in _route_handshake(port, None, None)
        assert b"Authorization Violation" in _route_handshake(port, "route", "guess")
        assert _route_handshake(port, "route", users.route_password).startswith(b"PONG")
    finally:
        cluster.stop()


REPLICA = [sys.executable, str(Path(__file__).with_name("replica_server.py"))]


def services_urls(fleet: Fleet) -> list[str]:
    """Every controller's services listener, in the order `shoal up` printed them."""
    return re.findall(r"services (http://\S+) ", fleet.log.read_text())


class Traffic:
    """Service requests one after another, each through the first services listener that
    answers (as a client that lists every controller would); when each succeeded or failed."""

    def __init__(self, bases: list[str], name: str) -> None:
        self.bases = bases
        self.name = name
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []  # when, and each listener's answer
        self.answered_by: set[str] = set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=3)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                why: list[str] = []
                for base in self.bases:
                    try:
                        async with http.get(f"{base}/s/{self.name}/") as resp:
                            body = (await resp.text()).strip()
                            if resp.status == 200:
                                self.ok.append(time.monotonic())
                                self.answered_by.add(body)
                                break
                            why.append(f"{base}: HTTP {resp.status} {body[:80]}")
                    except (aiohttp.ClientError, TimeoutError) as e:
                        why.append(f"{base}: {type(e).__name__} {e}")
                else:
                    self.failed.append((time.monotonic(), "; ".join(why)))
                await asyncio.sleep(0.05)

    def longest_gap(self, after: float) -> float:
        times = [after, *[t for t in self.ok if t >= after]]
        return max(b - a for a, b in itertools.pairwise(times)) if len(times) > 1 else -1.0


async def _echoed(att: Any, out: bytearray, token: bytes, timeout: float = 30) -> None:
    """Read the attachment until ``token`` is in ``out`` (it reconnects by itself)."""
    async def read() -> None:
        async for item in att:
            if isinstance(item, bytes):
                out.extend(item)
                if token in out:
                    return
            elif item.get("t") == "exit":
                raise AssertionError(f"the terminal ended: {item}")

    await asyncio.wait_for(read(), timeout)


async def _send_until_echoed(att: Any, out: bytearray, text: bytes, timeout: float) -> float:
    """Type ``text`` + Enter until cat's echo of it comes back: input sent while the client
    reconnects is refused (ConnectError), never lost quietly. Returns when it came back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await att.send(text + b"\r")
        except ConnectError:
            pass  # reading on is what reconnects
        try:
            await _echoed(att, out, text + b"\r\n" + text, timeout=5)
            return time.monotonic()
        except TimeoutError:
            assert time.monotonic() < deadline, f"{text!r} never echoed: {bytes(out)!r}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("with_controller", [False, True], ids=["server", "server+controller"])
def test_terminals_and_service_traffic_ride_out_losing_the_leading_server(
        tmp_path: Path, with_controller: bool) -> None:
    """A tty session attached through the Python client and requests to a 2-replica service
    are in flight when the leading server is SIGKILLed (and, in the second variant, the
    controller the terminal and the traffic go through, at the same moment)."""
    home = tmp_path / "home"
    fleet = Fleet(home, agents=3, extra_args=("--nats-cluster", "3"))
    try:
        fleet.start(timeout=60)
        jet = Jet(home)
        victim = meta_leader(home)
        jet.move_leader(OUTPUT_STREAM, victim)
        jet.move_leader(SESSIONS_STREAM, victim)
        controllers = controller_urls(tomllib.loads((home / "client.toml").read_text())["url"])
        services = services_urls(fleet)
        assert len(controllers) == len(services) == 3
        extra: subprocess.Popen[str] | None = None
        if with_controller:
            # A controller process of its own (those of `shoal up` share one process): the
            # one every client tries first, killed with the server.
            extra, url = fleet.controller()
            log = max(home.glob("controller-*.log"), key=lambda p: p.stat().st_mtime)
            found = re.search(r"services on (http://\S+)/s/NAME/", log.read_text())
            assert found, log.read_text()
            controllers, services = [url, *controllers], [found.group(1), *services]
        server = server_process(home, victim)
        result = asyncio.run(_ride_out(fleet, controllers, services, server, extra))
        print(f"killed {victim}{' and a controller' if extra else ''}: {result}")
    finally:
        fleet.stop()


async def _ride_out(fleet: Fleet, controllers: list[str], services: list[str],
                    server: psutil.Process, controller: subprocess.Popen[str] | None) -> str:
    async with Client(",".join(controllers), fleet.token, reconnect_for=60) as c:
        await c.create_service(st.ServiceSpec(name="web", command=REPLICA, replicas=2,
                                              check="http:/health", interval=0.2,
                                              timeout=0.5))
        deadline = time.monotonic() + 30
        while (view := await c.service("web")).up != 2:
            assert time.monotonic() < deadline, f"service not up: {view}"
            await asyncio.sleep(0.1)
        term = await c.create_session(m.SessionSpec(command=["cat"], tty=True))
        await wait_running(c, term.id)
        traffic = Traffic(services, "web")
        requests = asyncio.create_task(traffic.run())
        out = bytearray()
        try:
            async with c.attach(term.id) as att:
                await att.send(b"before\r")
                await _echoed(att, out, b"before\r\nbefore")
                await asyncio.sleep(1)
                assert traffic.ok and not traffic.failed, traffic.failed

                server.send_signal(signal.SIGKILL)
                if controller is not None:
                    controller.kill()
                killed_at = time.monotonic()

                # The terminal works on: a keystroke after the fault is echoed.
                echoed_at = await _send_until_echoed(att, out, b"after", timeout=45)
                # Service requests succeed again, and go on succeeding.
                deadline = killed_at + 45
                while len([t for t in traffic.ok if t > echoed_at]) < 20:
                    assert time.monotonic() < deadline, (
                        f"service traffic did not come back: {traffic.failed[-3:]}")
                    await asyncio.sleep(0.1)
                await att.send(b"last\r")
                await _echoed(att, out, b"last\r\nlast")
        finally:
            requests.cancel()
            await asyncio.gather(requests, return_exceptions=True)
        gap = traffic.longest_gap(killed_at - 1)
        assert traffic.answered_by == {r.id for r in (await c.service("web")).replicas}, \
            traffic.answered_by
        # Replay is byte-exact: what the terminal showed is what the output log holds.
        stored = b"".join([e.data async for e in c.logs(term.id) if isinstance(e, LogChunk)])
        assert stored.startswith(bytes(out)), (bytes(out), stored)
        # Each line typed is echoed once by the tty and once by cat: none lost or doubled
        # ("after" may have been typed again while its first echo was on its way).
        assert out.count(b"before") == 2 and out.count(b"last") == 2
        assert out.count(b"after") % 2 == 0 and out.count(b"after") >= 2
        async with c.attach(term.id) as again:  # a fresh attach replays the same bytes
            replay = bytearray()
            await _echoed(again, replay, b"last\r\nlast")
            assert bytes(replay) == stored[:len(replay)]
        if controller is not None:
            assert c.url != controllers[0]  # failed over to a controller that lives
        await c.kill(term.id)
        return (f"terminal echoed {echoed_at - killed_at:.1f}s after; longest service gap "
                f"{gap:.1f}s; {len(traffic.failed)} failed requests of "
                f"{len(traffic.failed) + len(traffic.ok)}"
                f"{': ' + traffic.failed[0][1] if traffic.failed else ''}")


def _server_urls(fleet: Fleet) -> dict[str, str]:
    """Each server's client URL, as `shoal up` printed them (n1, n2, n3)."""
    return dict(re.findall(r"^  (n\d): NATS (\S+) ", fleet.log.read_text(), re.MULTILINE))


@pytest.mark.timeout(90)
async def test_node_identities_hold_on_every_server_of_the_cluster(tmp_path: Path) -> None:
    """Node identities on `shoal up --nats-cluster 3` (the default): every server trusts the
    same operator and keeps a full resolver of its own. An agent enrolled through n1's
    controller works connected to n2 alone; revoking it through n1's controller closes its
    connection on n2, and no server takes its credential again."""
    import nats
    import nats.errors

    home = tmp_path / "home"
    fleet = Fleet(home, agents=0, extra_args=("--nats-cluster", "3"))
    try:
        fleet.start(timeout=60)
        servers = _server_urls(fleet)
        assert sorted(servers) == ["n1", "n2", "n3"], fleet.log.read_text()
        confs = {n: json.loads((home / "nats-cluster" / n / "nats.conf").read_text())
                 for n in servers}
        assert len({c["operator"] for c in confs.values()}) == 1  # one operator for all
        for n, conf in confs.items():
            assert "accounts" not in conf  # no users, no passwords: operator mode
            assert conf["resolver"]["type"] == "full"
            assert conf["resolver"]["dir"] == str(home / "nats-cluster" / n / "accounts")
        first_controller = controller_urls(
            tomllib.loads((home / "client.toml").read_text())["url"])[0]  # the one on n1

        def enroll(name: str, server: str) -> tuple[subprocess.Popen[str], Path]:
            r = fleet.shoal("token", "create", "--join", "--name", name)
            assert r.returncode == 0, r.stderr
            state = tmp_path / f"state-{name}"  # a machine of its own
            agent = fleet.agent(name, "--join", first_controller, "--token", r.stdout.strip(),
                                "--nats", servers[server], env={"SHOAL_STATE_DIR": str(state)})
            return agent, state / "identity" / f"{name}.creds"

        far, far_creds = enroll("far-1", "n2")
        other, _ = enroll("far-2", "n3")
        assert "enrolled far-1 " in fleet.log.read_text()  # by the controllers of shoal up
        for name in ("far-1", "far-2"):
            r = fleet.shoal("run", "-n", name, "--", "echo", "enrolled-on-n1")
            assert (r.returncode, r.stdout) == (0, f"{name}: enrolled-on-n1\n"), r.stderr

        r = fleet.shoal("nodes", "revoke", "far-1")  # through the first controller: n1
        assert r.returncode == 0, r.stderr
        far.wait(30)  # n2 closed its connection at once; it stops, saying why
        assert far.returncode != 0
        log = (home / "agent-far-1.log").read_text()
        assert "credential was revoked" in log, log
        for url in servers.values():  # its reconnect fails on every server
            with pytest.raises(nats.errors.Error, match="(?i)authorization"):
                await nats.connect(url, user_credentials=str(far_creds),
                                   allow_reconnect=False, max_reconnect_attempts=0)
        # Only that key: the node on n3 works on.
        assert other.poll() is None
        r = fleet.shoal("run", "-n", "far-2", "--", "echo", "still")
        assert (r.returncode, r.stdout) == (0, "far-2: still\n"), r.stderr
    finally:
        fleet.stop()


@pytest.mark.timeout(90)
async def test_a_server_down_during_a_revocation_refuses_the_node_soon_after(
        tmp_path: Path) -> None:
    """A server that was down while a node was revoked comes back with its old copy of the
    account: its full resolver takes the newer one from a peer at its next sync. That is every
    few seconds here (nats-server's default, 2 minutes, left a stolen credential usable on
    that server for as long)."""
    import nats
    import nats.errors
    from nats.aio.client import RawCredentials

    from shoal.config import write_secret_file
    from shoal.identity import claims
    from shoal.identity.authority import Authority

    authority = Authority.create()
    cluster = NatsCluster(tmp_path / "nats", NatsUsers.generate(), ClusterSpec.allocate(3),
                          jwt=authority.jwt_auth())
    cluster.start()
    try:
        ctl = tmp_path / "controller.creds"
        write_secret_file(ctl, authority.controller_creds(int(time.time())))
        await cluster.wait_formed(NatsConfig(url=cluster.url, creds=str(ctl)))
        seed = claims.new_seed("user")
        node = tmp_path / "node.creds"
        write_secret_file(node, claims.creds(authority.node_jwt(
            claims.public_key(seed), ["x"], int(time.time()) - 5, 3600), seed))
        n1, n3 = cluster.servers[0], cluster.servers[2]
        await (await nats.connect(n3.url, user_credentials=str(node))).close()

        await n3.astop()
        system = await nats.connect(n1.url, user_credentials=RawCredentials(
            authority.system_creds(int(time.time()))))
        try:  # the revocation, as a controller pushes it
            jwt = authority.account_jwt(int(time.time()),
                                        {claims.public_key(seed): int(time.time())})
            reply = await system.request("$SYS.REQ.CLAIMS.UPDATE", jwt.encode(), timeout=5)
            assert b'"code":200' in reply.data, reply.data
        finally:
            await system.close()
        with pytest.raises(nats.errors.Error, match="(?i)authorization"):
            await nats.connect(n1.url, user_credentials=str(node), allow_reconnect=False,
                               max_reconnect_attempts=0)

        await n3.astart()
        back = time.monotonic()
        while True:
            try:
                nc = await nats.connect(n3.url, user_credentials=str(node),
                                        allow_reconnect=False, max_reconnect_attempts=0)
            except nats.errors.Error as e:
                assert "authorization" in str(e).lower(), e
                break
            await nc.close()
            assert time.monotonic() - back < 40, "the returning server kept the old account"
            await asyncio.sleep(0.5)
        print(f"refused by the returning server {time.monotonic() - back:.1f}s after it was back")
    finally:
        cluster.stop()
