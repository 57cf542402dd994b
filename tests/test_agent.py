"""The agent's process discipline and the security baseline, with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import psutil
import pytest

from fleet import Fleet, processes_with_env, wait_for


def _stubborn_run(fleet: Fleet, node: str, marker: str) -> subprocess.Popen[str]:
    """A run whose processes ignore SIGTERM, left running in the background."""
    script = f"trap '' TERM; sleep {marker} & sleep {marker}; wait"
    return fleet.spawn("run", "-n", node, "--shell", script,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _sleepers(node: str) -> list[object]:
    found = []
    for p in processes_with_env("SHOAL_NODE", node):
        try:
            if p.name() in ("sleep", "sh"):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_sigterm_ends_runs_that_ignore_sigterm(fleet: Fleet) -> None:
    agent = fleet.agent("term-1", env={"SHOAL_GRACE": "1"})
    run = _stubborn_run(fleet, "term-1", "301")
    wait_for(lambda: len(_sleepers("term-1")) >= 3)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    assert not _sleepers("term-1")
    # The run reports how it ended (SIGKILL after the grace period), not a hang.
    out, err = run.communicate(timeout=20)
    assert run.returncode == 128 + signal.SIGKILL, err
    assert "the agent is stopping" in err
    fleet.wait_nodes(["term-1"], state="down", timeout=10)


def test_next_start_ends_what_a_killed_agent_left(fleet: Fleet) -> None:
    agent = fleet.agent("kill-1")
    run = _stubborn_run(fleet, "kill-1", "302")
    wait_for(lambda: len(_sleepers("kill-1")) >= 3)
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    time.sleep(0.5)
    assert _sleepers("kill-1"), "the processes outlive a SIGKILLed agent (as expected)"
    again = fleet.agent("kill-1")
    wait_for(lambda: not _sleepers("kill-1"))
    run.kill()
    run.communicate()
    again.send_signal(signal.SIGTERM)
    assert again.wait(20) == 0


def test_down_within_ten_seconds(fleet: Fleet) -> None:
    agent = fleet.agent("gone-1")
    os.kill(agent.pid, signal.SIGKILL)
    agent.wait()
    start = time.monotonic()
    fleet.wait_nodes(["gone-1"], state="down", timeout=10)
    assert time.monotonic() - start <= 10


# agent.toml of a fleet of node identities holds a join token: without it (and without a
# credential of its own) an agent has only the password it is given.
NO_JOIN = {"SHOAL_JOIN_URL": "", "SHOAL_JOIN_TOKEN": ""}


def test_wrong_nats_credentials_fail_fast_and_clearly(fleet: Fleet) -> None:
    start = time.monotonic()
    p = fleet.spawn("agent", "--name", "intruder",
                    env={"SHOAL_NATS_PASSWORD": "wrong", **NO_JOIN},
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=20)
    assert p.returncode != 0
    assert "refused the credentials" in err
    assert time.monotonic() - start < 15
    assert "intruder" not in fleet.nodes()


def test_no_nats_user_is_refused(fleet: Fleet) -> None:
    p = fleet.spawn("agent", "--name", "anon", "--nats-user", "",
                    env={"SHOAL_NATS_PASSWORD": "", **NO_JOIN},
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=20)
    assert p.returncode != 0 and "refused" in err


def test_http_requires_the_token(fleet: Fleet) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        req = urllib.request.Request(fleet.url + "/api/v1/nodes", headers=headers)
        try:
            urllib.request.urlopen(req, timeout=10)
            raise AssertionError("served without a valid token")
        except urllib.error.HTTPError as e:
            assert e.code == 401
            assert "token" in json.loads(e.read())["error"]
    r = fleet.shoal("--token", "wrong", "nodes")
    assert r.returncode != 0 and "missing or wrong token" in r.stderr
    req = urllib.request.Request(fleet.url + "/api/v1/nodes",
                                 headers={"Authorization": f"Bearer {fleet.token}"})
    assert urllib.request.urlopen(req, timeout=10).status == 200


def test_secrets_are_private(fleet: Fleet) -> None:
    for name in ("up.toml", "client.toml", "agent.toml", "controller.toml", "nats/nats.conf"):
        assert (fleet.home / name).stat().st_mode & 0o077 == 0, name
    assert fleet.token not in (fleet.home / "up.log").read_text().split("token=", 1)[1][60:]


def test_controller_unreachable_is_a_clear_error(fleet: Fleet) -> None:
    r = fleet.shoal("--url", "http://127.0.0.1:9", "nodes")
    assert r.returncode != 0 and "cannot reach the controller" in r.stderr


def test_a_node_dying_mid_run_is_named_not_waited_for(fleet: Fleet) -> None:
    agent = fleet.agent("mid-1")
    run = fleet.spawn("run", "-n", "mid-1", "--", "sleep", "305",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: _sleepers("mid-1"))
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    _, err = run.communicate(timeout=30)
    assert run.returncode == 255
    assert "mid-1: unreachable: node went down during the run" in err
    again = fleet.agent("mid-1")  # its next start ends the orphan
    wait_for(lambda: not _sleepers("mid-1"))
    again.send_signal(signal.SIGTERM)


def test_metrics_need_the_token_and_describe_the_fleet(fleet: Fleet) -> None:
    req = urllib.request.Request(fleet.url + "/metrics")
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("metrics served without a token")
    except urllib.error.HTTPError as e:
        assert e.code == 401
    req = urllib.request.Request(fleet.url + "/metrics",
                                 headers={"Authorization": f"Bearer {fleet.token}"})

    def agreeing() -> str | None:
        # Agents of earlier tests may still be going down: compare two reads of a still fleet.
        text = urllib.request.urlopen(req, timeout=10).read().decode()
        ready = sum(1 for n in fleet.nodes().values() if n["state"] == "ready")
        return text if f'shoal_nodes{{state="ready"}} {float(ready)}' in text else None

    text = wait_for(agreeing, timeout=20, interval=0.5)
    assert 'shoal_node_capacity{node="node-1"} 16.0' in text
    assert 'shoal_sessions{state="running"}' in text


def test_a_drained_node_stays_drained_across_agent_restarts(fleet: Fleet) -> None:
    agent = fleet.agent("drain-1")
    assert fleet.shoal("nodes", "drain", "drain-1").returncode == 0
    fleet.wait_nodes(["drain-1"], state="draining")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    again = fleet.agent("drain-1", wait=False)
    fleet.wait_nodes(["drain-1"], state="draining")
    assert fleet.shoal("nodes", "undrain", "drain-1").returncode == 0
    fleet.wait_nodes(["drain-1"], state="ready")
    again.send_signal(signal.SIGTERM)
    assert again.wait(20) == 0


def test_a_drain_deadline_holds_when_its_controller_dies(fleet: Fleet) -> None:
    agent = fleet.agent("dl-1")
    sid = fleet.shoal("session", "create", "--node", "dl-1", "--", "sleep", "60").stdout.strip()
    other, url = fleet.controller()
    assert fleet.shoal("--url", url, "nodes", "drain", "dl-1", "--deadline", "2").returncode == 0
    other.kill()
    other.wait()

    def ended() -> bool:
        record = json.loads(fleet.shoal("session", "show", sid).stdout)
        return record["state"] == "killed" and "drained" in record["reason"]

    wait_for(ended, timeout=20, interval=0.3)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0


def test_forget_a_node_that_is_gone(fleet: Fleet) -> None:
    agent = fleet.agent("old-1")
    r = fleet.shoal("nodes", "forget", "old-1")
    assert r.returncode != 0 and "stop its agent first" in r.stderr
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    fleet.wait_nodes(["old-1"], state="down")
    assert fleet.shoal("nodes", "forget", "old-1").returncode == 0
    assert "old-1" not in fleet.nodes()
    r = fleet.shoal("nodes", "forget", "old-1")
    assert r.returncode != 0 and "no node named" in r.stderr


def test_a_controller_with_a_follower_attached_stops_at_once(fleet: Fleet) -> None:
    """The finding: a `logs -f` (or an attached terminal) of a session that goes on held a
    controller's stop for aiohttp's default 60 s; it now gets 2 s, then is cut."""
    import http.client
    import urllib.parse

    sid = fleet.shoal("session", "create", "--", "sleep", "120").stdout.strip()
    other, url = fleet.controller()
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        conn.request("GET", f"/api/v1/sessions/{sid}/logs?follow=1",
                     headers={"Authorization": f"Bearer {fleet.token}"})
        response = conn.getresponse()
        assert response.status == 200
        other.send_signal(signal.SIGTERM)
        assert other.wait(30) == 0  # 60 s and more before
        with pytest.raises((http.client.HTTPException, ValueError, OSError)):
            response.read()  # cut, not left hanging
    finally:
        conn.close()
        if other.poll() is None:
            other.kill()
        fleet.shoal("session", "kill", sid)
