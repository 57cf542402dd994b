"""NATS SIGKILLed and started again under a fleet: a follower resumes byte-exact, and
creates sent at once get either a session (that runs) or 503 with Retry-After, never a final
`failed: no node has room` (the finding: ~10 s in which every create failed for good)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nats.errors

from faultkit import NatsFleet, counter, finish, health, wait_file_lines
from fleet import freeze, wait_for


def _create(url: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    """POST a session; (status, JSON body, Retry-After header)."""
    req = urllib.request.Request(url + "/api/v1/sessions", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {token}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers.get("Retry-After", "")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers.get("Retry-After", "")


def test_nats_sigkill_restart_then_immediate_creates(tmp_path: Path) -> None:
    with NatsFleet(tmp_path, agents=2) as nf:
        fleet = nf.fleet
        truth = tmp_path / "truth"
        r = fleet.shoal("session", "create", "--shell", counter(truth, 80, 0.1))
        assert r.returncode == 0, r.stderr
        out = tmp_path / "out"
        with open(out, "w") as f:
            follower = fleet.spawn("logs", "-f", r.stdout.strip(), stdout=f,
                                   stderr=subprocess.PIPE)
        wait_file_lines(out, 5)
        nf.kill_nats()
        wait_for(lambda: health(fleet.url) == 503, timeout=15)  # a balancer would notice
        time.sleep(7.0)  # past the node TTL (6 s): every heartbeat has lapsed meanwhile
        nf.server.start()
        outcomes: list[tuple[int, str, str]] = []
        created: list[str] = []
        deadline = time.monotonic() + 20
        while len(created) < 5 and time.monotonic() < deadline:
            status, body, retry_after = _create(fleet.url, fleet.token,
                                                {"command": ["echo", "hello"]})
            if status in (200, 201):
                assert body["state"] != "failed", body
                created.append(body["id"])
            else:
                # Not now, with a reason and when to ask again; nothing was created.
                assert status in (503, 504), body
                assert retry_after and body.get("error"), (status, body, retry_after)
                time.sleep(min(float(retry_after), 0.5))
            outcomes.append((status, body.get("state", ""), body.get("error", "")))
        assert len(created) == 5, outcomes

        def final(sid: str) -> str:
            r = fleet.shoal("session", "show", sid)
            state = json.loads(r.stdout)["state"] if r.returncode == 0 else ""
            return state if state in ("exited", "failed", "killed", "lost") else ""

        for sid in created:
            assert wait_for(lambda sid=sid: final(sid), timeout=30) == "exited"
            assert fleet.shoal("logs", sid).stdout == "hello\n"
        code, _, err = finish(follower)
        assert code == 0, err
        assert out.read_text() == truth.read_text()  # every byte once, across the restart
        assert wait_for(lambda: health(fleet.url) == 200, timeout=15)


def test_nats_hang_makes_healthz_not_ready_and_errors_say_why(tmp_path: Path) -> None:
    """The finding: during a NATS hang (SIGSTOP: the TCP connection stays up) /healthz said
    200 and the API answered `HTTP 504: ` with an empty reason."""
    import signal

    with NatsFleet(tmp_path, agents=1) as nf:
        fleet = nf.fleet
        assert nf.server.proc is not None
        nf.server.proc.send_signal(signal.SIGSTOP)
        try:
            assert wait_for(lambda: health(fleet.url) == 503, timeout=15)
            req = urllib.request.Request(fleet.url + "/api/v1/sessions/s-none",
                                         headers={"Authorization": f"Bearer {fleet.token}"})
            try:
                urllib.request.urlopen(req, timeout=30)
                raise AssertionError("answered while NATS hangs")
            except urllib.error.HTTPError as e:
                body = json.loads(e.read())
                assert e.code in (503, 504) and e.headers.get("Retry-After")
                assert "NATS" in body["error"], body
        finally:
            nf.server.proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: health(fleet.url) == 200, timeout=30)
        r = fleet.shoal("session", "create", "--", "echo", "after")
        assert r.returncode == 0, r.stderr


async def test_a_flush_that_timed_out_does_not_deafen_the_client(tmp_path: Path) -> None:
    """The finding (a partition healed after a flush timed out): nats-py 2.16 leaves the
    timed-out flush's future queued, the late PONG then raises InvalidStateError in its read
    loop, which stops for good; the client still says connected, so it never reconnects, and
    every request, KV put and JetStream ack times out from then on (an agent that came back
    from a partition stayed deaf until restarted)."""
    import asyncio
    import signal

    from shoal.config import NatsConfig
    from shoal.natsio import bus
    from shoal.natsio.natsd import NatsServer, NatsUsers, free_port

    users = NatsUsers.generate()
    server = NatsServer(tmp_path / "nats", users, port=free_port())
    server.start()
    try:
        nc = await bus.connect(NatsConfig(url=server.url, user="controller",
                                          password=users.controller_password), "deaf-test")
        try:
            async def echo(msg: Any) -> None:
                await msg.respond(b"pong")

            sub = await nc.subscribe("deaf.echo", cb=echo)
            assert server.proc is not None
            freeze(server.proc.pid)  # a cut link: the TCP connection stays
            try:
                try:
                    await nc.flush(timeout=1)
                    raise AssertionError("flushed while the server was stopped")
                except nats.errors.TimeoutError:
                    pass
            finally:
                server.proc.send_signal(signal.SIGCONT)
            reply = await nc.request("deaf.echo", b"ping", timeout=10)
            assert reply.data == b"pong"
            await sub.unsubscribe()
        finally:
            await asyncio.wait_for(nc.close(), 10)
    finally:
        server.stop()
