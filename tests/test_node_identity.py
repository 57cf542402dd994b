"""Every node its own NATS identity (``shoal up``'s default, docs/security.md):
what one node's stolen credential cannot do, refused by nats-server itself; enrollment
with join tokens; revocation; renewal before expiry."""

from __future__ import annotations

import asyncio
import json
import os
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
from shoal.natsio import outputlog
from shoal.natsio.natsd import free_port, server_binary
from shoal.wire import hostbeat, reports
from shoal.wire import messages as m
from shoal.wire.reports import OutputLast, OutputTrim, OutputWhere, OutputWhereReply

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

    async def allowed(self, verb: str, subjects: list[str]) -> list[str]:
        """Those of ``subjects`` the server does not refuse (all tried at once: waiting
        for each in turn would outlast the credential where many are allowed)."""
        for subject in subjects:
            if verb == "subscribe":
                async def ignore(msg: object) -> None:
                    pass
                await self.nc.subscribe(subject, cb=ignore)
            else:
                await self.nc.publish(subject, b"{}")
        await self.nc.flush()
        wanted = f"permissions violation for {'subscription' if verb == 'subscribe' else 'publish'}"

        def left() -> list[str]:
            return [s for s in subjects if not any(wanted in e and f'"{s.lower()}"' in e
                                                   for e in self.errors)]
        deadline = time.monotonic() + 5
        while left() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return left()

    async def refused(self, verb: str, subject: str) -> bool:
        """Whether the server answers a subscribe or publish on ``subject`` with a
        permissions violation (its -ERR, which names the subject)."""
        return not await self.allowed(verb, [subject])


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
    "shoal.report.node-b.session",  # node-b's session reports (records are written on them)
    "$JS.API.STREAM.DELETE.shoal-output",  # the output stream itself
    "$JS.API.STREAM.CREATE.impostor",
    "$JS.API.CONSUMER.CREATE.shoal-output",  # a consumer reading every session's output
    "$KV.shoal-tokens.x",  # API tokens
    "$KV.shoal-identities.impostor",  # enroll without a join token
    "$KV.shoal-join.x",
    "$SYS.REQ.CLAIMS.UPDATE",  # the account itself (revocations)
    "shoal.out.s1.node-b",  # session output as node-b
    "shoal.tout.t_1.node-b",  # pool terminal output as node-b
    "shoal.out.s1",  # the old shape, which readers still believe
    "shoal.tout.t_1",
    "$JS.API.STREAM.MSG.GET.shoal-output",  # any session's stored output, by sequence
    "$JS.API.STREAM.MSG.GET.shoal-terminal-output",
    "$JS.API.DIRECT.GET.shoal-output",
    "$JS.API.DIRECT.GET.shoal-output.shoal.out.s1.node-b",
    "$JS.API.STREAM.INFO.shoal-output",
    "$JS.API.STREAM.INFO.shoal-terminal-output",
    "$JS.API.CONSUMER.CREATE.shoal-output.r.shoal.out.s1.node-b",  # a consumer of it
    "$JS.API.CONSUMER.CREATE.shoal-terminal-output",
    "$JS.API.CONSUMER.DURABLE.CREATE.shoal-output.r",
]


async def test_a_node_credential_reaches_its_own_node_only(idfleet: Fleet,
                                                           nodes_ab: tuple[str, str]) -> None:
    probe = await Probe.open(idfleet, "node-a")
    try:
        # Its own node's subjects are allowed (the probe can tell refused from allowed).
        assert not await probe.refused("subscribe", "shoal.agent.node-a.>")
        assert not await probe.refused("publish", "$KV.shoal-registry.node-a")
        allowed = await probe.allowed("subscribe", SUBSCRIBE_ABUSES)
        allowed += await probe.allowed("publish", PUBLISH_ABUSES)
        assert allowed == [], f"the server let node-a's credential use {allowed}"
        assert not await probe.refused("publish", "shoal.out.s1.node-a")  # its own output
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


async def test_a_node_cannot_read_stored_output(idfleet: Fleet,
                                                nodes_ab: tuple[str, str]) -> None:
    """With the JetStream API as any client would use it: the server refuses the request
    (a permissions violation), so no answer ever comes."""
    async with Client(idfleet.url, idfleet.token) as client:
        r = await client.wait((await client.create_session(m.SessionSpec(
            shell="echo secret-output", node="node-b"))).id)
    probe = await Probe.open(idfleet, "node-a")
    try:
        js = probe.nc.jetstream(timeout=2)
        with pytest.raises(nats.errors.TimeoutError):
            await js.get_last_msg("shoal-output", f"shoal.out.{r.id}.node-b")
        with pytest.raises(nats.errors.TimeoutError):
            await js.pull_subscribe(f"shoal.out.{r.id}.node-b", stream="shoal-output")
        wait_for(lambda: any("permissions violation for publish" in e
                             and "$js.api.stream.msg.get.shoal-output" in e
                             for e in probe.errors))
        assert any("$js.api.consumer.create.shoal-output" in e for e in probe.errors)
    finally:
        await probe.nc.close()


async def test_a_node_learns_nothing_of_another_nodes_session_output(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """Where a session's output stands is told only to the node of its current attempt
    (for any other it is the answer that fences a zombie)."""
    async with Client(idfleet.url, idfleet.token) as client:
        r = await client.wait((await client.create_session(m.SessionSpec(
            shell="echo some-output", node="node-b"))).id)
        probe = await Probe.open(idfleet, "node-a")
        try:
            msg = await probe.nc.request("shoal.report.node-a.output", msgspec.msgpack.encode(
                OutputWhere(r.id, r.attempt)), timeout=10)
        finally:
            await probe.nc.close()
        reply = msgspec.msgpack.decode(msg.data, type=OutputWhereReply)
        assert not reply.ok and reply.last == OutputLast(), reply
        assert "is not node node-a's" in reply.reason
        await client.remove(r.id)


async def test_output_a_node_publishes_for_another_nodes_session_never_shows(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """node-a's credential may publish output under its own name: chunks it forges for a
    session node-b runs (its attempt, offsets, an end marker) appear in no reader (logs,
    logs -f), and
    node-b's writer goes on storing the real output after them."""
    async with Client(idfleet.url, idfleet.token) as client:
        r = await client.create_session(m.SessionSpec(
            shell="echo before; sleep 2; echo after", node="node-b"))
        deadline = time.monotonic() + 30
        while (r := await client.session(r.id)).state != "running":
            assert time.monotonic() < deadline, r
            await asyncio.sleep(0.1)

        async def follow() -> bytes:  # logs -f, reading while the forgeries arrive
            return b"".join([e.data async for e in client.logs(r.id, follow=True)
                             if isinstance(e, LogChunk)])
        following = asyncio.create_task(follow())
        probe = await Probe.open(idfleet, "node-a")
        forgeries = (outputlog.Chunk("stdout", 0, b"FORGED\n", r.attempt),
                     outputlog.Chunk(outputlog.ATTEMPT, 7, b"", r.attempt + 1),
                     outputlog.Chunk("stdout", 7, b"FORGED\n", r.attempt + 1),
                     outputlog.Chunk(outputlog.END, 14, b"", r.attempt))
        # The session's old-shape subject (refused), and node-a's own name (allowed, and
        # not believed).
        try:
            for subject in (f"shoal.out.{r.id}", f"shoal.out.{r.id}.node-a"):
                for chunk in forgeries:
                    await probe.nc.publish(subject, msgspec.msgpack.encode(chunk))
                await probe.nc.publish(subject, b"not a chunk")
                await probe.nc.flush()
        finally:
            await probe.nc.close()
        done = await client.wait(r.id)
        data = b"".join([e.data async for e in client.logs(r.id) if isinstance(e, LogChunk)])
        assert data == b"before\nafter\n"
        assert await asyncio.wait_for(following, 30) == data
        assert probe.errors and all(f'"shoal.out.{r.id}"' in e for e in probe.errors), \
            probe.errors
        assert done.state == "exited" and done.exit_code == 0, done
        assert done.placements == ["node-b"]
        await client.remove(r.id)


async def test_a_node_in_a_run_cannot_speak_for_another_node_of_it(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """node-a is given the run's id (it runs it too) and may publish on its own event
    subject; an exit it sends there naming node-b is ignored by the controller."""
    probe = await Probe.open(idfleet, "node-a")
    try:
        forged = asyncio.Event()

        async def forge(msg: nats.aio.msg.Msg) -> None:
            req = m.unpack(msg.data, m.RunRequest)
            await asyncio.sleep(1)  # node-b has started, and runs for another second
            await probe.nc.publish(f"shoal.run.{req.run_id}.out.node-a", m.pack(m.Exit(
                node="node-b", code=99, reason="forged")))
            forged.set()

        await probe.nc.subscribe("shoal.agent.node-a.run", cb=forge)
        await probe.nc.flush()
        run = await asyncio.to_thread(idfleet.shoal, "run", "-n", "node-a,node-b", "--", "sh",
                                      "-c", 'sleep 2; echo "real $SHOAL_NODE"; exit 3')
        assert forged.is_set()
        assert "node-b: real node-b" in run.stdout, run.stdout + run.stderr
        said = run.stdout + run.stderr
        assert "forged" not in run.stdout and "99" not in said, said
        assert "exit 3: node-a,node-b" in said, said
    finally:
        await probe.nc.close()
    wait_for(lambda: "node-a sent an event for node node-b; ignored" in idfleet.log.read_text())


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


# ---------------------------------------------------------------- session records

async def _running(client: Client, sid: str, timeout: float = 30) -> m.SessionRecord:
    deadline = time.monotonic() + timeout
    while True:
        r = await client.session(sid)
        if r.state == "running" and r.pid:
            return r
        assert r.state not in ("exited", "failed", "killed", "lost"), r
        assert time.monotonic() < deadline, r
        await asyncio.sleep(0.1)


async def test_a_node_credential_cannot_read_write_or_watch_session_records(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """Session records are the controllers' alone: node-a reads no record (not node-b's
    spec, its env secrets; not even its own), writes, deletes or purges none, and cannot
    watch the bucket. The server refuses each."""
    async with Client(idfleet.url, idfleet.token) as client:
        b = await client.create_session(m.SessionSpec(command=["sleep", "30"], node="node-b",
                                                      env={"TOKEN": "s3cret"}))
        a = await client.create_session(m.SessionSpec(command=["sleep", "30"], node="node-a"))
        before = await _running(client, b.id)
        await _running(client, a.id)
        kv = "shoal-sessions"
        abuses = [
            ("publish", f"$KV.{kv}.{b.id}"),  # rewrite (or delete: a put with a header)
            ("publish", f"$KV.{kv}.{a.id}"),  # even its own record
            ("publish", f"$KV.{kv}.new-session"),  # invent one
            ("publish", f"$JS.API.DIRECT.GET.KV_{kv}.$KV.{kv}.{b.id}"),  # read node-b's spec
            ("publish", f"$JS.API.STREAM.MSG.GET.KV_{kv}"),
            ("publish", f"$JS.API.CONSUMER.CREATE.KV_{kv}"),  # watch every record
            ("publish", f"$JS.API.CONSUMER.CREATE.KV_{kv}.w.$KV.{kv}.>"),
            ("publish", f"$JS.API.STREAM.INFO.KV_{kv}"),
            ("publish", f"$JS.API.STREAM.PURGE.KV_{kv}"),  # delete every record
            ("publish", f"$JS.API.STREAM.DELETE.KV_{kv}"),
            ("subscribe", f"$KV.{kv}.>"),
            ("publish", "shoal.report.node-b.session"),  # report as node-b
        ]
        allowed = []
        for verb, subject in abuses:  # a connection each: a server may close one it let in
            probe = await Probe.open(idfleet, "node-a")
            try:
                if not await probe.refused(verb, subject):
                    allowed.append(subject)
            except nats.errors.ConnectionClosedError:
                allowed.append(subject)  # closed without a permissions violation
            finally:
                await probe.nc.close()
        assert allowed == [], f"the server let node-a's credential use {allowed}"
        probe = await Probe.open(idfleet, "node-a")
        try:
            with pytest.raises(nats.errors.Error):  # the ordinary KV client gets nowhere
                await probe.nc.jetstream().key_value(kv)
        finally:
            await probe.nc.close()
        after = await client.session(b.id)
        assert after == before  # node-b's session ran on, untouched
        await client.kill(a.id)
        await client.kill(b.id)


async def test_a_node_report_on_another_nodes_session_is_refused_by_the_controller(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """node-a may report on its own subject only; what it says about node-b's session is
    refused by the controller (the record names node-b), said in its log, and changes
    nothing."""
    async with Client(idfleet.url, idfleet.token) as client:
        b = await client.create_session(m.SessionSpec(command=["sleep", "30"], node="node-b",
                                                      restart="always"))
        before = await _running(client, b.id)
        probe = await Probe.open(idfleet, "node-a")
        try:
            async def report(msg: reports.SessionReport) -> reports.SessionReportReply:
                answer = await probe.nc.request("shoal.report.node-a.session",
                                                reports.pack(msg), timeout=15)
                return reports.unpack_reply(answer.data)

            for forged in (reports.SessionMove(b.id, before.attempt, "exited", exit_code=0),
                           reports.SessionMove(b.id, before.attempt, "running", pid=1),
                           reports.SessionReschedule(b.id, before.attempt, "forged"),
                           reports.SessionDropped(b.id, before.attempt, "forged")):
                reply = await report(forged)
                assert not reply.ok and reply.refused == "not_yours", (forged, reply)
            # A restart of node-a settles node-a's records only; a check tells it nothing
            # about node-b's session but that it is not node-a's.
            assert (await report(reports.SessionsRestarted())).ok
            check = await report(reports.SessionsCheck({b.id: before.attempt}))
            assert b.id in check.gone
            bad = await probe.nc.request("shoal.report.node-a.session", b"\x93junk",
                                         timeout=15)
            assert reports.unpack_reply(bad.data).refused == "bad"
        finally:
            await probe.nc.close()
        wait_for(lambda: f"node node-a reported on session {b.id}, which runs on node-b: "
                 "refused" in idfleet.log.read_text())
        assert await client.session(b.id) == before
        await client.kill(b.id)


async def test_sessions_live_and_end_through_the_controllers(
        idfleet: Fleet, nodes_ab: tuple[str, str]) -> None:
    """The lifecycle with node credentials that cannot touch records: started, running,
    the exit code recorded, a kill, a restart by policy."""
    async with Client(idfleet.url, idfleet.token) as client:
        done = await client.create_session(m.SessionSpec(shell="echo out; exit 3",
                                                         node="node-a"))
        done = await client.wait(done.id)
        assert (done.state, done.exit_code, done.node) == ("exited", 3, "node-a"), done
        data = b"".join([e.data async for e in client.logs(done.id)
                         if isinstance(e, LogChunk)])
        assert data == b"out\n"
        longer = await client.create_session(m.SessionSpec(command=["sleep", "30"],
                                                           node="node-b", ports=1))
        running = await _running(client, longer.id)
        assert running.ports and running.node == "node-b" and running.attempt == 1
        await client.kill(longer.id)
        killed = await client.wait(longer.id)
        assert killed.state == "killed", killed
        again = await client.create_session(m.SessionSpec(
            shell="sleep 0.2; exit 1", node="node-a", restart="on-failure"))
        deadline = time.monotonic() + 30
        while (await client.session(again.id)).restarts < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await client.kill(again.id)
        assert (await client.wait(again.id)).state == "killed"
        for sid in (done.id, longer.id, again.id):
            await client.remove(sid)


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


async def test_an_agent_restart_and_a_lost_node_settle_their_sessions(
        idfleet: Fleet) -> None:
    """The records of an agent that restarted are settled by the controllers on its
    report (a plain session lost, a daemon placed again); a node that stays away has its
    daemon moved to another node and the rest lost."""
    token = join_token(idfleet, "--uses", "2", "--labels", "pool=q")
    agents = {"node-q1": enrolled(idfleet, "node-q1", token),
              "node-q2": enrolled(idfleet, "node-q2", token)}
    async with Client(idfleet.url, idfleet.token) as client:
        plain = await client.create_session(m.SessionSpec(command=["sleep", "60"],
                                                          node="node-q1"))
        daemon = await client.create_session(m.SessionSpec(command=["sleep", "60"],
                                                           node="node-q1", restart="always"))
        await _running(client, plain.id)
        placed = await _running(client, daemon.id)
        os.killpg(agents["node-q1"].pid, signal.SIGKILL)
        agents["node-q1"].wait()
        agents["node-q1"] = enrolled(idfleet, "node-q1", token)  # back within the node TTL
        lost = await client.wait(plain.id, timeout=30)
        assert lost.state == "lost" and "agent of node-q1 restarted" in lost.reason, lost
        moved = await _running(client, daemon.id)
        assert moved.node == "node-q1" and moved.attempt == placed.attempt + 1, moved
        # Now one node of the pool goes for good: its daemon goes to the other one.
        roaming = await client.create_session(m.SessionSpec(command=["sleep", "60"],
                                                            selector={"pool": "q"},
                                                            restart="always"))
        on = (await _running(client, roaming.id)).node
        other = "node-q2" if on == "node-q1" else "node-q1"
        plain2 = await client.create_session(m.SessionSpec(command=["sleep", "60"], node=on))
        await _running(client, plain2.id)
        os.killpg(agents[on].pid, signal.SIGKILL)
        agents[on].wait()
        gone = await client.wait(plain2.id, timeout=30)
        assert gone.state == "lost" and on in gone.reason, gone
        deadline = time.monotonic() + 30
        while (elsewhere := await client.session(roaming.id)).node != other \
                or elsewhere.state != "running":
            assert time.monotonic() < deadline, elsewhere
            await asyncio.sleep(0.2)
        assert elsewhere.restarts == 1 and elsewhere.attempt == 2, elsewhere
        for sid in (plain.id, daemon.id, roaming.id, plain2.id):
            await client.kill(sid)
