"""Sessions end to end: lifecycle, placement, durable output, restarts, drain, both APIs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet import SHOAL, Fleet, wait_for, wait_running
from shoal.client.aio import Client, LogChunk, LogEnd
from shoal.errors import ConflictError, ConnectError, NotFoundError, ValidationError
from shoal.wire import messages as m


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with fleet.client() as c:
        yield c


def spec(**kw: Any) -> m.SessionSpec:
    return m.SessionSpec(**kw)


@pytest.mark.tls
async def test_lifecycle_exited(client: Client) -> None:
    r = await client.create_session(spec(command=["sh", "-c", "echo out; echo err >&2; exit 4"]))
    assert r.state in ("starting", "running", "exited") and r.node in ("node-1", "node-2")
    r = await client.wait(r.id)
    assert (r.state, r.exit_code, r.signal) == ("exited", 4, None)
    chunks = [e async for e in client.logs(r.id) if isinstance(e, LogChunk)]
    assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"out\n"
    assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"err\n"
    assert r.output_bytes == 8


async def test_lifecycle_failed_to_start(client: Client) -> None:
    r = await client.wait((await client.create_session(spec(command=["no-such-cmd-zz"]))).id)
    assert (r.state, r.exit_code) == ("failed", 127)
    assert "command not found: no-such-cmd-zz" in r.reason


@pytest.mark.tls
async def test_lifecycle_killed_and_signal(client: Client) -> None:
    r = await client.create_session(spec(shell="trap 'echo got-usr1' USR1; "
                                               "while true; do sleep 0.1; done"))
    await wait_running(client, r.id)
    await client.signal(r.id, "USR1")
    await wait_output(client, r.id, b"got-usr1")
    await client.kill(r.id)
    r = await client.wait(r.id)
    assert (r.state, r.reason) == ("killed", "killed on request")
    with pytest.raises(ConflictError):
        await client.signal(r.id, "TERM")


async def test_timeouts(client: Client) -> None:
    r = await client.wait((await client.create_session(spec(command=["sleep", "30"],
                                                            timeout=0.5))).id)
    assert r.state == "killed" and "timed out after 0.5s" in r.reason
    r = await client.wait((await client.create_session(spec(command=["sleep", "30"],
                                                            idle_timeout=1))).id)
    assert r.state == "killed" and "idle timeout" in r.reason


async def test_ports_are_allocated_and_published(client: Client) -> None:
    r = await client.create_session(spec(shell='echo "$PORT $SHOAL_PORTS"', ports=2))
    r = await client.wait(r.id)
    out = b"".join([e.data async for e in client.logs(r.id) if isinstance(e, LogChunk)])
    port, ports = out.decode().split()
    assert [int(p) for p in ports.split(",")] == r.ports and int(port) == r.ports[0]
    assert r.address


async def test_limits_apply(client: Client) -> None:
    r = await client.create_session(spec(shell="ulimit -n; ulimit -t",
                                         limits=m.Limits(open_files=64, cpu_seconds=7)))
    r = await client.wait(r.id)
    out = b"".join([e.data async for e in client.logs(r.id) if isinstance(e, LogChunk)])
    assert out.split() == [b"64", b"7"]


async def test_idempotent_create_under_concurrent_duplicates(client: Client) -> None:
    records = await asyncio.gather(*(client.create_session(spec(id="same-key",
                                                                command=["sleep", "30"]))
                                     for _ in range(20)))
    assert {r.id for r in records} == {"same-key"}
    assert len([r for r in await client.sessions(name="same-key")]) == 1
    live = await client.sessions(state="live")
    assert len([r for r in live if r.id == "same-key"]) == 1
    with pytest.raises(ConflictError, match="different session already has id same-key"):
        await client.create_session(spec(id="same-key", command=["sleep", "31"]))
    await client.remove("same-key")
    with pytest.raises(NotFoundError):
        await client.session("same-key")


async def test_restart_policy_and_give_up(client: Client, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    # on-failure: fails twice, then succeeds; the record shows the restarts.
    script = f'n=$(cat {flag} 2>/dev/null || echo 0); echo $((n+1)) > {flag}; ' \
             f'echo run-$n; [ "$n" -ge 2 ]'
    r = await client.wait((await client.create_session(
        spec(shell=script, restart="on-failure"))).id, timeout=30)
    assert (r.state, r.exit_code, r.restarts) == ("exited", 0, 2)
    out = b"".join([e.data async for e in client.logs(r.id) if isinstance(e, LogChunk)])
    assert out == b"run-0\nrun-1\nrun-2\n"
    r = await client.wait((await client.create_session(
        spec(command=["false"], restart="always"))).id, timeout=60)
    assert r.state == "failed" and "gave up after 5 quick failures" in r.reason


@pytest.mark.tls
async def test_bad_input_gets_4xx_json(fleet: Fleet) -> None:
    headers = {"Authorization": f"Bearer {fleet.token}"}
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/api/v1/sessions", b"{not json", 400),
        ("POST", "/api/v1/sessions", {"command": "not a list"}, 422),
        ("POST", "/api/v1/sessions", {"command": []}, 422),
        ("POST", "/api/v1/sessions", {"command": ["x"], "shell": "y"}, 400),
        ("POST", "/api/v1/sessions", {}, 400),
        ("POST", "/api/v1/sessions", {"command": ["x"], "id": "bad id!"}, 422),
        ("POST", "/api/v1/sessions", {"command": ["x"], "timeout": -1}, 422),
        ("POST", "/api/v1/sessions", {"command": ["x"], "surprise": 1}, 422),
        ("POST", "/api/v1/sessions", {"command": ["x"], "node": "nope"}, 404),
        ("POST", "/api/v1/sessions", {"command": ["x"], "user": "no such/user"}, 400),
        ("POST", "/api/v1/sessions", {"command": ["x" * 70000]}, 422),
        ("GET", "/api/v1/sessions?state=bogus", None, 400),
        ("GET", "/api/v1/sessions?label=novalue", None, 400),
        ("GET", "/api/v1/sessions/nope", None, 404),
        ("DELETE", "/api/v1/sessions/nope", None, 404),
        ("POST", "/api/v1/sessions/nope/signal", {"signal": "TERM"}, 404),
        ("POST", "/api/v1/sessions/nope/kill", None, 404),
        ("GET", "/api/v1/sessions/nope/logs", None, 404),
        ("GET", "/api/v1/sessions/nope/logs?from=-1", None, 400),
        ("GET", "/api/v1/nodes/nope", None, 404),
        ("POST", "/api/v1/nodes/nope/drain", {}, 404),
        ("POST", "/api/v1/nodes/node-1/drain", {"deadline": -5}, 400),
        ("POST", "/api/v1/nodes/node-1/drain", {"bogus": 1}, 422),
        ("POST", "/api/v1/nodes/nope/undrain", None, 404),
        ("GET", "/api/v1/no-such-thing", None, 404),
        ("PUT", "/api/v1/sessions", None, 405),
    ]
    async with fleet.http(headers=headers) as http:
        sid = (await (await http.post(fleet.url + "/api/v1/sessions",
                                      json={"command": ["sleep", "20"]})).json())["id"]
        cases += [
            ("POST", f"/api/v1/sessions/{sid}/signal", {"signal": "NOPE"}, 400),
            ("POST", f"/api/v1/sessions/{sid}/signal", {"signal": 99}, 400),
            ("GET", f"/api/v1/sessions/{sid}/logs?follow=maybe", None, 400),
        ]
        before = await (await http.get(fleet.url + "/api/v1/sessions")).json()
        for method, path, body, status in cases:
            kw: dict[str, Any] = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with http.request(method, fleet.url + path, **kw) as resp:
                assert resp.status == status, (method, path, body, await resp.text())
                err = await resp.json()
                assert err["status"] == status and len(err["error"]) > 10
        after = await (await http.get(fleet.url + "/api/v1/sessions")).json()
        assert len(after) == len(before), "bad input changed nothing"
        await http.delete(fleet.url + f"/api/v1/sessions/{sid}")


async def test_client_errors_are_shoal_errors(client: Client) -> None:
    with pytest.raises(ValidationError):
        await client.create_session({"command": ["x"], "shell": "y"})
    with pytest.raises(NotFoundError):
        await client.kill("no-such-session")


@pytest.mark.tls
def test_cli_session_commands(fleet: Fleet, tmp_path: Path) -> None:
    r = fleet.shoal("session", "create", "--name", "cli-1", "--", "sh", "-c",
                    "echo hello; echo; echo world")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    r = fleet.shoal("logs", "-f", sid)
    assert r.stdout == "hello\n\nworld\n"
    assert fleet.shoal("logs", "--skip-empty", sid).stdout == "hello\nworld\n"
    assert fleet.shoal("logs", "--from", "6", sid).stdout == "\nworld\n"
    assert fleet.shoal("logs", "--tail", "6", sid).stdout == "world\n"
    r = fleet.shoal("session", "list", "--json")
    assert sid in {s["id"] for s in json.loads(r.stdout)}
    r = fleet.shoal("session", "create", "--", "sh", "-c", "echo ready; sleep 30")
    sid2 = r.stdout.strip()
    assert fleet.shoal("logs", "-f", "--until", "ready", sid2).returncode == 0
    assert fleet.shoal("session", "kill", "--wait", sid2).returncode == 0
    assert json.loads(fleet.shoal("session", "show", sid2).stdout)["state"] == "killed"
    assert fleet.shoal("session", "rm", sid, sid2).returncode == 0
    r = fleet.shoal("session", "show", sid)
    assert r.returncode != 0 and "no session" in r.stderr
    d = tmp_path / "daemons"
    d.mkdir()
    for name in ("a.sh", "b.sh"):
        (d / name).write_text(f"#!/bin/sh\necho {name} on $SHOAL_NODE\nsleep 30\n")
        (d / name).chmod(0o755)
    (d / "README").write_text("not executable")
    r = fleet.shoal("launch", str(d), "--json")
    assert r.returncode == 0, r.stderr
    landed = json.loads(r.stdout)
    assert sorted(s["name"] for s in landed) == ["a.sh", "b.sh"]
    assert all(s["node"] in ("node-1", "node-2") for s in landed)
    for s in landed:
        fleet.shoal("session", "rm", s["id"])


async def wait_output(client: Client, sid: str, needle: bytes, timeout: float = 15) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = b"".join([e.data async for e in client.logs(sid) if isinstance(e, LogChunk)])
        if needle in out:
            return out
        await asyncio.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared in {sid}")


@pytest.mark.tls
async def test_logs_byte_exact_with_a_reader_that_resumes(client: Client, tmp_path: Path) -> None:
    data = tmp_path / "random.bin"
    data.write_bytes(os.urandom(50 << 20))
    want = hashlib.sha256(data.read_bytes()).hexdigest()
    r = await client.create_session(spec(command=["cat", str(data)]))
    got = hashlib.sha256()
    offset = 0
    async for ev in client.logs(r.id, follow=True):  # disconnect after ~20 MB
        if isinstance(ev, LogChunk):
            got.update(ev.data)
            offset = ev.offset + len(ev.data)
            if offset > 20 << 20:
                break
    async for ev in client.logs(r.id, start=offset, follow=True):
        if isinstance(ev, LogChunk):
            assert ev.offset == offset
            got.update(ev.data)
            offset += len(ev.data)
        elif isinstance(ev, LogEnd):
            assert ev.state == "exited"
    assert offset == 50 << 20
    assert got.hexdigest() == want
    await client.remove(r.id)


async def test_output_cap_truncates_explicitly(client: Client) -> None:
    r = await client.create_session(spec(
        shell="for i in 1 2 3 4 5 6; do head -c 50000 /dev/zero; sleep 0.1; done",
        output_cap=100000))
    r = await client.wait(r.id)
    events = [e async for e in client.logs(r.id)]
    assert type(events[0]).__name__ == "LogTruncated"
    kept = sum(len(e.data) for e in events if isinstance(e, LogChunk))
    assert 100000 <= kept < 300000 and events[0].end == 300000 - kept  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def big_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("big") / "home", agents=2,
              extra_args=("--capacity", "50")).start()
    try:
        yield f
    finally:
        f.stop()


async def test_200_creates_on_100_slots(big_fleet: Fleet) -> None:
    async with Client(big_fleet.url, big_fleet.token) as c:
        records = await asyncio.gather(*(c.create_session(spec(command=["sleep", "60"]))
                                         for _ in range(200)))
        assert len({r.id for r in records}) == 200
        failed = [r for r in records if r.state == "failed"]
        placed = [r for r in records if r.state != "failed"]
        assert len(placed) == 100 and len(failed) == 100
        assert all(r.reason.startswith("no node has room") for r in failed)
        per_node = {n: sum(r.node == n for r in placed) for n in ("node-1", "node-2")}
        assert per_node == {"node-1": 50, "node-2": 50}
        live = await c.sessions(state="live")
        assert len(live) == 100
        await asyncio.gather(*(c.remove(r.id) for r in records))
        assert not await c.sessions()


async def test_drain_with_deadline(big_fleet: Fleet) -> None:
    async with Client(big_fleet.url, big_fleet.token) as c:
        await c.drain("node-2")  # so that both land on node-1, unpinned
        big_fleet.wait_nodes(["node-2"], state="draining")
        daemon = await c.create_session(spec(command=["sleep", "60"], restart="always"))
        plain = await c.create_session(spec(command=["sleep", "60"]))
        assert (await wait_running(c, daemon.id)).node == "node-1"
        assert (await wait_running(c, plain.id)).node == "node-1"
        await c.undrain("node-2")
        big_fleet.wait_nodes(["node-2"])
        await c.drain("node-1", deadline=1, wait=True)
        big_fleet.wait_nodes(["node-1"], state="draining")
        after = await c.wait(plain.id)
        assert after.state == "killed" and "drained" in after.reason
        moved = await wait_running(c, daemon.id)
        assert moved.node == "node-2" and moved.restarts == 1
        refused = await c.create_session(spec(command=["true"], node="node-1"))
        assert refused.state == "failed"
        await c.undrain("node-1")
        big_fleet.wait_nodes(["node-1"])
        await c.remove(daemon.id)


async def test_sigkilled_agent_sessions_become_lost(big_fleet: Fleet) -> None:
    agent = big_fleet.agent("doomed-1")
    async with Client(big_fleet.url, big_fleet.token) as c:
        plain = await c.create_session(spec(command=["sleep", "60"], node="doomed-1"))
        await wait_running(c, plain.id)
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        start = time.monotonic()
        r = await c.wait(plain.id, timeout=20)
        assert r.state == "lost" and "doomed-1" in r.reason
        assert time.monotonic() - start < 15
    # Its process was left running; the next start of the agent ends it.
    again = big_fleet.agent("doomed-1")
    from fleet import processes_with_env

    wait_for(lambda: not processes_with_env("SHOAL_SESSION_ID", plain.id))
    again.send_signal(signal.SIGTERM)
    assert again.wait(20) == 0


@pytest.mark.tls
async def test_nats_api_two_controllers_answer_once(fleet: Fleet) -> None:
    """A second controller process; each NATS request gets exactly one reply."""
    from shoal.config import ControllerConfig, load
    from shoal.natsio import bus

    second, _ = fleet.controller()
    cfg = load(ControllerConfig, fleet.home / "controller.toml")
    nc = await bus.connect(cfg.nats, "test")  # its certificate too, on a TLS fleet
    try:
        answered_by = set()
        for i in range(20):
            inbox = nc.new_inbox()
            replies: list[Any] = []

            async def collect(msg: Any, replies: list[Any] = replies) -> None:
                replies.append(json.loads(msg.data))

            sub = await nc.subscribe(inbox, cb=collect)
            body = {"command": ["true"], "id": f"via-nats-{i}"} if i < 3 else {}
            op = "sessions.create" if i < 3 else "nodes.list"
            await nc.publish(f"shoal.api.{op}", json.dumps(body).encode(), reply=inbox)
            await asyncio.sleep(0.3)
            await sub.unsubscribe()
            assert len(replies) == 1, replies
            assert replies[0]["ok"], replies[0]
            answered_by.add(replies[0]["controller"])
        assert len(answered_by) == 2, "both controllers serve the queue group"
        bad = await nc.request("shoal.api.sessions.create", b'{"command": []}', timeout=5)
        reply = json.loads(bad.data)
        assert not reply["ok"] and reply["status"] == 422
        reply = json.loads((await nc.request("shoal.api.sessions.show",
                                             b'{"id": "via-nats-0"}', timeout=5)).data)
        assert reply["result"]["id"] == "via-nats-0"
    finally:
        await nc.close()
        second.send_signal(signal.SIGTERM)
        second.wait(20)


@pytest.mark.tls
async def test_controller_restart_loses_nothing(fleet: Fleet) -> None:
    """Kill -9 a controller while a terminal is attached and a log is followed through it;
    start it again; both clients resume from their offsets: no byte lost or doubled."""
    port = _free_port()

    def start_controller() -> subprocess.Popen[str]:
        return fleet.controller(port)[0]

    ctl = start_controller()
    url = f"{fleet.url.split(':')[0]}://127.0.0.1:{port}"
    async with Client(url, fleet.token, ca=str(fleet.ca or "")) as c:
        counter = await c.create_session(spec(shell="i=1; while [ $i -le 300 ]; do "
                                                    "echo line-$i; i=$((i+1)); sleep 0.01; done"))
        term = await c.create_session(spec(command=["cat"], tty=True))
        await wait_running(c, term.id)
        followed = bytearray()
        offset = 0
        term_out = bytearray()
        term_offset = 0
        att_cm = c.attach(term.id)
        att = await att_cm.__aenter__()
        await att.send(b"before\r")
        async for item in att:
            if isinstance(item, bytes):
                term_out += item
                if b"before\r\nbefore" in term_out:
                    break
        term_offset = att.offset
        async for ev in c.logs(counter.id, follow=True):
            if isinstance(ev, LogChunk):
                followed += ev.data
                offset = ev.offset + len(ev.data)
                if followed.count(b"\n") >= 50:
                    break
        ctl.kill()
        ctl.wait()
        c.reconnect_for = 0  # this test resumes by hand: give up at once, loudly
        with pytest.raises(ConnectError, match="resume from byte"):
            async for item in att:  # never a quiet end without an exit frame
                assert not isinstance(item, dict) or item.get("t") != "exit"
        c.reconnect_for = 60
        await att_cm.__aexit__(None, None, None)
        ctl = start_controller()
        async for ev in c.logs(counter.id, start=offset, follow=True):
            if isinstance(ev, LogChunk):
                assert ev.offset == offset
                followed += ev.data
                offset += len(ev.data)
        assert followed.decode().split() == [f"line-{i}" for i in range(1, 301)]
        async with c.attach(term.id, start=term_offset) as att2:
            await att2.send(b"after\r")
            async for item in att2:
                if isinstance(item, bytes):
                    term_out += item
                    if b"after\r\nafter" in term_out:
                        break
        full = b"".join([e.data async for e in c.logs(term.id) if isinstance(e, LogChunk)])
        assert bytes(term_out) == full[:len(term_out)]
        assert term_out.count(b"before") == 2
        await c.remove(term.id)
        await c.remove(counter.id)
    ctl.send_signal(signal.SIGTERM)
    ctl.wait(20)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_shoal_binary_is_the_venv_one() -> None:
    assert os.path.exists(SHOAL)


@pytest.mark.tls
def test_cli_attach_replays_and_detaches(fleet: Fleet) -> None:
    from fleet import Terminal

    sid = fleet.shoal("session", "create", "--tty", "--", "bash", "--norc", "--noprofile",
                      "-i").stdout.strip()
    term = Terminal([SHOAL, "session", "attach", sid], fleet.env, rows=20, cols=90)
    try:
        term.read_until(b"bash")
        term.write(b"echo first-$((40+2)); stty size\r")
        term.read_until(b"first-42")
        term.read_until(b"20 90")
        term.write(b"\x1d")  # Ctrl-]: detach, the session goes on
        term.read_until(b"detached from " + sid.encode())
        assert term.proc.wait(10) == 0
    finally:
        term.close()
    again = Terminal([SHOAL, "session", "attach", sid], fleet.env)
    try:
        again.read_until(b"first-42")  # replayed
        again.write(b"exit 5\r")
        again.read_until(b"session exited")
        assert again.proc.wait(10) == 5
    finally:
        again.close()
    assert json.loads(fleet.shoal("session", "show", sid).stdout)["exit_code"] == 5


async def test_input_to_a_session_that_is_not_reading_is_held_not_dropped(
        client: Client, tmp_path: Path) -> None:
    # More input than a pipe holds, sent while the process reads nothing: the agent holds
    # it (bounded) and writes it as the process reads; none is lost, none reordered.
    go = tmp_path / "go"
    size = 512 << 10
    rec = await wait_running(client, (await client.create_session(spec(
        shell=f'while [ ! -e "{go}" ]; do sleep 0.05; done; head -c {size} | sha256sum',
        stdin=True))).id)
    data = b"".join(bytes([i]) * (32 << 10) for i in range(size // (32 << 10)))
    async with client.attach(rec.id) as att:
        for i in range(0, size, 32 << 10):
            await att.send(data[i:i + (32 << 10)])
        await asyncio.sleep(1.0)  # let it all reach the agent before the process reads
        go.touch()
        done = await client.wait(rec.id, timeout=30)
    assert done.state == "exited" and done.exit_code == 0, done
    out = b"".join([e.data async for e in client.logs(rec.id) if isinstance(e, LogChunk)])
    assert out.split()[0].decode() == hashlib.sha256(data).hexdigest(), out
    await client.remove(rec.id)
