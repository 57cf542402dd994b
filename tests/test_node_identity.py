"""Every node its own NATS identity (``shoal up``'s default, docs/security.md):
what one node's stolen credential cannot do, refused by nats-server itself; enrollment
with join tokens; revocation; renewal before expiry."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import pytest

from fleet import SHOAL, Fleet, wait_for
from shoal.client.aio import Client, LogChunk
from shoal.config import AgentConfig, load
from shoal.identity import claims
from shoal.natsio.natsd import free_port, server_binary
from shoal.wire import hostbeat
from shoal.wire import messages as m
from shoal.wire.reports import OutputTrim

LIFETIME = 20  # seconds a node credential lasts here: renewed every ~13 s during the tests


@pytest.fixture(scope="module")
def idfleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("idfleet") / "home", agents=0)  # node identities
    f.env["SHOAL_NODE_CREDENTIAL_LIFETIME"] = str(LIFETIME)
    f.start()
    try:
        yield f
    finally:
        f.stop()


def join_token(fleet: Fleet, *args: str) -> str:
    r = fleet.shoal("token", "create", "--join", *args)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def creds_of(fleet: Fleet, name: str) -> Path:
    return fleet.home / "agent-state" / "identity" / f"{name}.creds"


def nats_url(fleet: Fleet) -> str:
    return load(AgentConfig, fleet.home / "agent.toml").nats.url


def enrolled(fleet: Fleet, name: str, token: str) -> subprocess.Popen[str]:
    return fleet.agent(name, "--join", fleet.url, "--token", token)


@pytest.fixture(scope="module")
def nodes_ab(idfleet: Fleet) -> tuple[str, str]:
    token = join_token(idfleet, "--uses", "2", "--expires", "10m")
    enrolled(idfleet, "node-a", token)
    enrolled(idfleet, "node-b", token)
    return "node-a", "node-b"


class Probe:
    """A raw NATS client holding one node's credential, and what the server said to it."""

    def __init__(self, nc: nats.aio.client.Client, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    @classmethod
    async def open(cls, fleet: Fleet, name: str) -> Probe:
        errors: list[str] = []

        async def on_error(e: Exception) -> None:
            errors.append(str(e).lower())

        nc = await nats.connect(nats_url(fleet), user_credentials=str(creds_of(fleet, name)),
                                error_cb=on_error, allow_reconnect=False,
                                inbox_prefix=f"_INBOX_AGENT.{name}")
        return cls(nc, errors)

    async def refused(self, verb: str, subject: str) -> bool:
        """Whether the server answers a subscribe or publish on ``subject`` with a
        permissions violation (its -ERR, which names the subject)."""
        if verb == "subscribe":
            async def ignore(msg: object) -> None:
                pass
            await self.nc.subscribe(subject, cb=ignore)
        else:
            await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        wanted = f"permissions violation for {'subscription' if verb == 'subscribe' else 'publish'}"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(wanted in e and subject.lower() in e for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


# What today's shared agent user allowed every node (docs/security.md, "What a stolen agent
# credential can do"), tried with node-a's credential against node-b and the fleet.
SUBSCRIBE_ABUSES = [
    "shoal.agent.node-b.>",  # node-b's run and session requests: argv, env, cwd
    "shoal.agent.*.>",  # every node's requests
    "shoal.agent.node-b.ctl.session.>",  # keystrokes typed into node-b's terminals
    "shoal.agent.node-b.ctl.run.>",  # stdin of node-b's runs
    "shoal.agent.node-b.ack.run.>",
    "shoal.run.*.ctl",  # the old shared run control subject
    "shoal.session.*.ctl",  # the old shared session control subject
    "shoal.run.*.out.*",  # every node's run output
    "shoal.run.*.out.node-b",
    "shoal.out.>",  # every session's output, live
    "shoal.tout.>",
    "_INBOX_AGENT.node-b.>",  # replies to node-b
    "_INBOX.>",  # replies to controllers and clients
    "shoal.api.>",  # the controllers' API requests (tokens in them)
    "$KV.>",
]
PUBLISH_ABUSES = [
    "$KV.shoal-heartbeats._h-node-b-0",  # a heartbeat as node-b
    "$KV.shoal-heartbeats._h-impostor-0",  # a heartbeat of a new node name
    "$KV.shoal-registry.node-b",  # node-b's registry entry
    "$KV.shoal-registry.impostor",  # register a new node name
    "shoal.run.r1.out.node-b",  # run output as node-b
    "shoal.run.r1.inack.node-b",
    "shoal.agent.node-b.run",  # a run request to node-b, as if from a controller
    "shoal.agent.node-b.ctl.session.s1",  # keystrokes into node-b's sessions
    "shoal.identity.renew.node-b",  # node-b's credential renewal
    "shoal.api.sessions.create",  # the controllers' API
    "$JS.API.STREAM.PURGE.shoal-output",  # every session's stored output
    "$JS.API.STREAM.PURGE.shoal-terminal-output",
    "shoal.report.node-b.trim",  # node-b's requests to trim its sessions' output
    "$JS.API.STREAM.DELETE.shoal-output",  # the output stream itself
    "$JS.API.STREAM.CREATE.impostor",
    "$JS.API.CONSUMER.CREATE.shoal-output",  # a consumer reading every session's output
    "$KV.shoal-tokens.x",  # API tokens
    "$KV.shoal-identities.impostor",  # enroll without a join token
    "$KV.shoal-join.x",
    "$SYS.REQ.CLAIMS.UPDATE",  # the account itself (revocations)
]


async def test_a_node_credential_reaches_its_own_node_only(idfleet: Fleet,
                                                           nodes_ab: tuple[str, str]) -> None:
    probe = await Probe.open(idfleet, "node-a")
    try:
        # Its own node's subjects are allowed (the probe can tell refused from allowed).
        assert not await probe.refused("subscribe", "shoal.agent.node-a.>")
        assert not await probe.refused("publish", "$KV.shoal-registry.node-a")
        allowed = [s for s in SUBSCRIBE_ABUSES if not await probe.refused("subscribe", s)]
        allowed += [s for s in PUBLISH_ABUSES if not await probe.refused("publish", s)]
        assert allowed == [], f"the server let node-a's credential use {allowed}"
    finally:
        await probe.nc.close()


async def test_the_controller_credential_is_not_the_http_token(idfleet: Fleet) -> None:
    """The token the HTTP API takes is no NATS credential (operator mode has no passwords)."""
    with pytest.raises(nats.errors.Error):
        await nats.connect(nats_url(idfleet), user="controller", password=idfleet.token,
                           allow_reconnect=False, max_reconnect_attempts=0)
    with pytest.raises(nats.errors.Error):
        await nats.connect(nats_url(idfleet), token=idfleet.token, allow_reconnect=False,
                           max_reconnect_attempts=0)


def test_the_credential_is_a_standard_creds_file_made_on_the_node(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    path = creds_of(idfleet, "node-a")
    assert path.stat().st_mode & 0o777 == 0o600
    found = claims.parse_creds(path.read_text())
    jwt = claims.decode(found.jwt)
    assert jwt["sub"] == claims.public_key(found.seed)  # the key the node made
    assert "shoal-node:node-a" in jwt["nats"]["tags"]
    assert jwt["exp"] - jwt["iat"] == LIFETIME
    # The seed was never sent: the controller's bucket keeps the public key only.
    r = idfleet.shoal("run", "-n", "node-a", "--", "true")
    assert r.returncode == 0, r.stderr


async def test_the_output_cap_still_bites_through_the_controllers(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """The node may not purge; it asks, and the controller trims its own session."""
    async with Client(idfleet.url, idfleet.token) as client:
        r = await client.create_session(m.SessionSpec(
            shell="for i in 1 2 3 4 5 6; do head -c 50000 /dev/zero; sleep 0.1; done",
            output_cap=100000, node="node-a"))
        r = await client.wait(r.id)
        assert r.node == "node-a" and r.state == "exited", r
        events = [e async for e in client.logs(r.id)]
        assert type(events[0]).__name__ == "LogTruncated"
        kept = sum(len(e.data) for e in events if isinstance(e, LogChunk))
        assert 100000 <= kept < 300000
        await client.remove(r.id)


async def test_a_node_cannot_get_another_nodes_session_output_trimmed(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    async with Client(idfleet.url, idfleet.token) as client:
        r = await client.create_session(m.SessionSpec(shell="echo kept-output", node="node-b"))
        r = await client.wait(r.id)
        probe = await Probe.open(idfleet, "node-a")
        try:  # node-a's own report subject, naming node-b's session: the controller ignores it
            await probe.nc.publish("shoal.report.node-a.trim",
                                   msgspec.msgpack.encode(OutputTrim(r.id, 1 << 40)))
            await probe.nc.flush()
        finally:
            await probe.nc.close()
        wait_for(lambda: "asked to trim the output of session" in idfleet.log.read_text())
        data = b"".join([e.data async for e in client.logs(r.id) if isinstance(e, LogChunk)])
        assert b"kept-output" in data
        await client.remove(r.id)


async def test_a_heartbeat_chunk_cannot_invent_or_claim_nodes(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """The server lets node-a write only its own heartbeat key; what the chunk lists is
    checked by the controllers against node-a's enrollment."""
    ctl = await nats.connect(nats_url(idfleet), user_credentials=str(
        idfleet.home / "identity" / "controller.creds"))
    try:
        beats = await ctl.jetstream().key_value("shoal-heartbeats")
        beat = hostbeat.decode((await beats.get("_h-node-a-0")).value or b"")
    finally:
        await ctl.close()
    probe = await Probe.open(idfleet, "node-a")
    try:
        beats = await probe.nc.jetstream().key_value("shoal-heartbeats")
        forged = msgspec.structs.replace(beat, nodes=[
            *beat.nodes, hostbeat.NodeBeat("impostor"), hostbeat.NodeBeat("node-b", 7)])
        await beats.put("_h-node-a-0", hostbeat.encode(forged))
    finally:
        await probe.nc.close()
    wait_for(lambda: "names nodes its credential was not enrolled for: impostor, node-b"
             in idfleet.log.read_text())
    nodes = idfleet.nodes()
    assert "impostor" not in nodes
    assert nodes["node-b"]["sessions"] != 7 and nodes["node-a"]["state"] == "ready"


def test_join_token_refusals_are_clear(idfleet: Fleet, nodes_ab: tuple[str, str],
                                      tmp_path: Path) -> None:
    def join(name: str, token: str) -> str:
        # Another machine: a state directory of its own (no credential of node-a's there).
        state = tmp_path / f"state-{name}-{time.monotonic_ns()}"
        r = idfleet.shoal("agent", "--name", name, "--join", idfleet.url, "--token", token,
                          timeout=40, env={"SHOAL_STATE_DIR": str(state)})
        assert r.returncode != 0, r.stdout + r.stderr
        assert not (state / "identity" / f"{name}.creds").exists()
        return r.stderr

    expired = join_token(idfleet, "--expires", "1s")
    time.sleep(1.5)
    assert "join token expired" in join("late-node", expired)

    once = join_token(idfleet, "--uses", "1")
    enrolled(idfleet, "node-c", once)
    assert "join token is used up" in join("node-d", once)

    fresh = join_token(idfleet, "--uses", "5")
    assert "already enrolled: node-a" in join("node-a", fresh)
    assert "unknown join token" in join("node-e", fresh + "x")

    named = join_token(idfleet, "--name", "node-f")
    assert "enrolls the node node-f only" in join("node-g", named)


def test_a_node_cannot_take_another_name_with_its_credential(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    r = idfleet.shoal("agent", "--name", "node-b", "--nats-creds",
                      str(creds_of(idfleet, "node-a")), timeout=40)
    assert r.returncode != 0
    assert "is for node-a, not node-b" in r.stderr


def test_credentials_are_renewed_before_they_expire(idfleet: Fleet,
                                                    nodes_ab: tuple[str, str]) -> None:
    path = creds_of(idfleet, "node-a")
    first = claims.decode(claims.parse_creds(path.read_text()).jwt)["iat"]
    # Past the first credential's expiry: still connected, on a newer credential.
    wait_for(lambda: claims.decode(claims.parse_creds(path.read_text()).jwt)["exp"]
             > first + LIFETIME, timeout=LIFETIME * 2)
    time.sleep(max(0.0, first + LIFETIME + 2 - time.time()))
    assert "renewed the NATS credential of node-a" in (idfleet.home / "agent-node-a.log") \
        .read_text()
    r = idfleet.shoal("run", "-n", "node-a", "--", "echo", "still-here")
    assert r.returncode == 0 and "still-here" in r.stdout, r.stdout + r.stderr


async def test_revoke_cuts_a_live_agent_off_and_it_cannot_come_back(idfleet: Fleet) -> None:
    token = join_token(idfleet, "--name", "node-r")
    agent = enrolled(idfleet, "node-r", token)
    r = idfleet.shoal("nodes", "revoke", "node-r")
    assert r.returncode == 0, r.stderr
    agent.wait(30)  # the server closed its connection at once; it stops, saying why
    assert agent.returncode != 0
    log = (idfleet.home / "agent-node-r.log").read_text()
    assert "credential was revoked" in log, log
    # Said once in the log (and once as the exit message); no retry loop after it.
    after = log[log.index("closed this agent's connection"):]
    assert "reconnect" not in after.replace("not reconnecting", ""), after
    with pytest.raises(nats.errors.Error, match="(?i)authorization"):
        await nats.connect(nats_url(idfleet), user_credentials=str(creds_of(idfleet, "node-r")),
                           allow_reconnect=False, max_reconnect_attempts=0)
    again = idfleet.shoal("agent", "--name", "node-r", timeout=40)
    assert again.returncode != 0 and "refused the credentials" in again.stderr, again.stderr
    # Not renewable either, and the fleet sees it down.
    wait_for(lambda: idfleet.nodes().get("node-r", {}).get("state") in ("down", None),
             timeout=30)
    listing = json.loads(idfleet.shoal("nodes", "--json").stdout)
    assert all(n["name"] != "node-r" or n["state"] == "down" for n in listing)


async def test_a_revocation_survives_a_restart_of_the_fleet(idfleet: Fleet) -> None:
    """The servers start from the accounts as first made; the revocation pushed since is
    newer, and is what the resolver keeps (and the controller pushes again at start)."""
    token = join_token(idfleet, "--name", "node-s")
    agent = enrolled(idfleet, "node-s", token)
    assert idfleet.shoal("nodes", "revoke", "node-s").returncode == 0
    agent.wait(30)
    idfleet.stop()
    idfleet.procs.clear()
    idfleet.start()
    with pytest.raises(nats.errors.Error, match="(?i)authorization"):
        await nats.connect(nats_url(idfleet), user_credentials=str(creds_of(idfleet, "node-s")),
                           allow_reconnect=False, max_reconnect_attempts=0)
    enrolled(idfleet, "node-t", join_token(idfleet, "--name", "node-t"))
    r = idfleet.shoal("run", "-n", "node-t", "--", "echo", "back")
    assert r.returncode == 0 and "back" in r.stdout, r.stderr


def test_an_expired_credential_is_refused_at_start_with_what_to_do(
        idfleet: Fleet, tmp_path: Path) -> None:
    state = tmp_path / "state"
    p = idfleet.agent("node-x", "--join", idfleet.url, "--token",
                      join_token(idfleet, "--name", "node-x"),
                      env={"SHOAL_STATE_DIR": str(state)})
    p.send_signal(signal.SIGTERM)  # off, and so not renewing
    p.wait(30)
    path = state / "identity" / "node-x.creds"
    expires = claims.decode(claims.parse_creds(path.read_text()).jwt)["exp"]
    time.sleep(max(0.0, expires + 1 - time.time()))
    r = idfleet.shoal("agent", "--name", "node-x", timeout=40,
                      env={"SHOAL_STATE_DIR": str(state)})
    assert r.returncode == 2 and "expired at" in r.stderr and "enroll again" in r.stderr, \
        r.stderr


async def test_keys_and_an_include_for_your_own_nats_servers(tmp_path: Path) -> None:
    """``shoal admin node-identities DIR``: what your own nats-server includes to run in
    operator mode, and the controllers' credential for it; passwords no longer work."""
    keys = tmp_path / "keys"
    r = subprocess.run([SHOAL, "admin", "node-identities", str(keys)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    again = subprocess.run([SHOAL, "admin", "node-identities", str(keys)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr  # never new keys over old
    port = free_port()
    conf = tmp_path / "server.conf"
    conf.write_text(f'host: 127.0.0.1\nport: {port}\njetstream {{ store_dir: "{tmp_path}/js" }}\n'
                    'include "keys/nats-identity.conf"\n')  # relative to this file
    server = subprocess.Popen([server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"nats://127.0.0.1:{port}"
        nc = None
        for _ in range(100):
            assert server.poll() is None, "nats-server did not take the configuration"
            try:
                nc = await nats.connect(url, user_credentials=str(keys / "controller.creds"),
                                        allow_reconnect=False, max_reconnect_attempts=0)
                break
            except (nats.errors.Error, OSError):
                await asyncio.sleep(0.1)
        assert nc is not None
        kv = await nc.jetstream().create_key_value(bucket="probe")
        await kv.put("k", b"v")
        await nc.close()
        with pytest.raises(nats.errors.Error):
            await nats.connect(url, user="agent", password="x", allow_reconnect=False,
                               max_reconnect_attempts=0)
    finally:
        server.terminate()
        server.wait(10)
