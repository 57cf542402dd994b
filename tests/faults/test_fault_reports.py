"""Session reports outlive the controllers: agents no longer write records, so what happens
to a session while no controller runs (it exits, it restarts) is asked again until one is
back, and then recorded, in order."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from faultkit import NatsFleet
from fleet import Fleet, processes_with_env, wait_for
from shoal.client.aio import Client
from shoal.config import ControllerConfig, load
from shoal.natsio import bus
from shoal.wire import messages as m
from shoal.wire import subjects


def test_an_exit_while_no_controller_runs_is_recorded_once_one_is_back(tmp_path: Path) -> None:
    with NatsFleet(tmp_path, agents=0) as nf:
        fleet = nf.fleet
        agent = fleet.agent("solo", env=nf.agent_env)
        again, done = tmp_path / "again", tmp_path / "done"
        made = fleet.shoal("session", "create", "--node", "solo", "--restart", "on-failure",
                           "--shell", f"sleep 4; [ -e {again} ] && touch {done} && exit 0; "
                                      f"touch {again}; exit 1")
        assert made.returncode == 0, made.stderr
        sid = made.stdout.strip()
        wait_for(lambda: json.loads(fleet.shoal("session", "show", sid).stdout)["state"]
                 == "running")
        assert fleet.up is not None  # the fleet's controller (its NATS is the test's own)
        fleet.up.send_signal(signal.SIGTERM)
        assert fleet.up.wait(30) == 0
        # It fails once (restarted by policy), then exits 0, with no controller to tell.
        wait_for(done.exists, timeout=30)
        wait_for(lambda: not processes_with_env("SHOAL_SESSION_ID", sid), timeout=20)
        time.sleep(3)  # a few tries go unanswered
        log = (fleet.home / "agent-solo.log").read_text()
        assert "no controller took a report of node solo" in log, log
        ctl, url = fleet.controller()
        try:
            seen: list[object] = []

            def final() -> dict[str, object]:
                r = fleet.shoal("session", "show", sid, env={"SHOAL_URL": url})
                rec: dict[str, object] = json.loads(r.stdout) if r.returncode == 0 else {}
                seen[:] = [rec or r.stderr]
                return rec if rec.get("state") == "exited" else {}

            deadline = time.monotonic() + 30
            while not (rec := final()):
                assert time.monotonic() < deadline, seen
                time.sleep(0.2)
            assert rec["exit_code"] == 0 and rec["restarts"] == 1, rec
            assert rec["node"] == "solo" and rec["attempt"] == 1, rec
        finally:
            ctl.send_signal(signal.SIGTERM)
            ctl.wait(20)
            agent.send_signal(signal.SIGTERM)
            agent.wait(20)


async def test_a_yes_without_a_go_never_runs_and_gives_its_room_back(tmp_path: Path) -> None:
    """A controller that dies between a node's yes and writing the record (here: a start
    request with no go after it): the node asks after a while, hears the record does not
    name it, and releases what it reserved; the process never starts."""
    fleet = Fleet(tmp_path / "home", agents=1).start()
    try:
        node = next(iter(fleet.nodes()))
        marker = tmp_path / "ran"
        spec = m.SessionSpec(id="s-nogo", command=["touch", str(marker)], ports=1)
        record = m.SessionRecord(id="s-nogo", spec=spec, created=time.time())
        # The controllers' own credential (a password, or their .creds under node identities)
        nc = await bus.connect(load(ControllerConfig, fleet.home / "controller.toml").nats,
                               "test")
        try:
            answer = await nc.request(subjects.agent_session(node, "start"), m.pack(
                m.SessionStart(id="s-nogo", digest=m.spec_digest(spec), record=record)),
                timeout=10)
        finally:
            await nc.close()
        reply = m.unpack(answer.data, m.SessionStartReply)
        assert reply.ok and reply.ports, reply
        wait_for(lambda: fleet.nodes()[node]["sessions"] == 1)  # the room is held for the go
        wait_for(lambda: fleet.nodes()[node]["sessions"] == 0, timeout=30)
        assert not marker.exists()
        async with Client(fleet.url, fleet.token) as c:  # the node takes sessions again
            r = await c.create_session(m.SessionSpec(command=["sleep", "30"], ports=1))
            assert r.state == "starting" and r.node == node and r.ports, r
            await c.kill(r.id)
    finally:
        fleet.stop()
