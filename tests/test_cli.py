"""The command line as a whole, on a real fleet: every command that prints a record takes
``--json`` and prints that record as JSON; ``-e``/``-l``/``-s`` are parsed by one parser
everywhere (a bad one is refused, nothing is created); one map from errors to exit statuses;
``shoal run``'s start-up imports neither aiohttp nor asyncio; the blocking ``SyncClient``
that the commands use survives an interrupted call."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from fleet import SHOAL, Fleet, wait_for
from shoal.cli.main import exit_code
from shoal.client.aio import LogChunk
from shoal.client.sync import SyncClient
from shoal.errors import (
    AuthError,
    ConfigError,
    ConnectError,
    NotFoundError,
    ShoalError,
    Unavailable,
    ValidationError,
)
from shoal.wire.messages import SessionSpec

REPLICA = [sys.executable, str(Path(__file__).with_name("replica_server.py"))]


def as_json(fleet: Fleet, *args: str) -> Any:
    """``shoal ARGS --json`` (before a ``--``: what follows is the command's)."""
    cut = args.index("--") if "--" in args else len(args)
    r = fleet.shoal(*args[:cut], "--json", *args[cut:])
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return json.loads(r.stdout)


def session_ids(fleet: Fleet) -> set[str]:
    return {s["id"] for s in as_json(fleet, "session", "list")}


# ---------------------------------------------------------------------- --json


def test_node_commands_print_json(fleet: Fleet) -> None:
    listed = as_json(fleet, "nodes")
    assert {n["name"] for n in listed} >= {"node-1", "node-2"}
    assert as_json(fleet, "nodes", "--summary")["nodes"] == len(listed)
    shown = as_json(fleet, "nodes", "show", "node-1")
    assert shown["name"] == "node-1" and shown["state"] == "ready"
    try:
        drained = as_json(fleet, "nodes", "drain", "node-2")
        assert isinstance(drained, dict)
        fleet.wait_nodes(["node-2"], state="draining")
    finally:
        assert fleet.shoal("nodes", "undrain", "node-2").returncode == 0
    fleet.wait_nodes(["node-2"])


def test_session_commands_print_json(fleet: Fleet, tmp_path: Path) -> None:
    made = as_json(fleet, "session", "create", "--name", "j1", "-e", "A=1", "-l", "k=v",
                   "--", "sleep", "300")
    sid = made["id"]
    assert made["spec"]["env"] == {"A": "1"} and made["spec"]["labels"] == {"k": "v"}
    assert as_json(fleet, "session", "show", sid)["id"] == sid
    # Without --json too: the record is JSON either way (what scripts read today).
    assert json.loads(fleet.shoal("session", "show", sid).stdout)["id"] == sid
    assert sid in [s["id"] for s in as_json(fleet, "session", "list")]
    wait_for(lambda: as_json(fleet, "session", "show", sid)["state"] == "running")
    assert as_json(fleet, "session", "signal", sid, "CONT")["id"] == sid
    ended = as_json(fleet, "session", "kill", "--wait", sid)
    assert [(r["id"], r["state"]) for r in ended] == [(sid, "killed")]
    assert fleet.shoal("session", "rm", sid).returncode == 0
    (tmp_path / "d").mkdir()
    script = tmp_path / "d" / "one"
    script.write_text("#!/bin/sh\nsleep 300\n")
    script.chmod(0o755)
    launched = as_json(fleet, "launch", str(tmp_path / "d"))
    assert [r["spec"]["name"] for r in launched] == ["one"]
    assert fleet.shoal("session", "rm", launched[0]["id"]).returncode == 0


def test_service_commands_print_json(fleet: Fleet) -> None:
    made = as_json(fleet, "service", "create", "jsvc", "--interval", "0.2",
                   "--check-timeout", "0.5", "--rise", "1", "--", *REPLICA)
    assert made["name"] == "jsvc" and made["url"].endswith("/s/jsvc/")
    assert "jsvc" in [v["name"] for v in as_json(fleet, "service", "list")]
    wait_for(lambda: as_json(fleet, "service", "show", "jsvc")["up"] == 1, timeout=30)
    best = as_json(fleet, "best", "jsvc")
    assert best["port"] > 0 and best["host"]
    assert as_json(fleet, "service", "scale", "jsvc", "1")["spec"]["replicas"] == 1
    assert as_json(fleet, "service", "drain", "jsvc")["name"] == "jsvc"
    assert fleet.shoal("service", "rm", "jsvc").returncode == 0


def test_token_and_audit_commands_print_json(fleet: Fleet) -> None:
    made = as_json(fleet, "token", "create", "--user", "jay", "--scope", "read")
    assert made["user"] == "jay" and made["token"]
    assert made["id"] in [t["id"] for t in as_json(fleet, "token", "list")]
    me = as_json(fleet, "whoami")
    assert me["user"] == "admin" and "admin" in me["scopes"]
    gone = as_json(fleet, "token", "revoke", made["id"])
    assert gone["id"] == made["id"] and gone["user"] == "jay"
    entries = as_json(fleet, "audit", "--user", "admin")
    assert "tokens.create" in [e["op"] for e in entries]
    assert as_json(fleet, "audit", "--verify")["problems"] == []


# ---------------------------------------------------------------------- -e, -l, -s


@pytest.mark.parametrize("args,fragment", [
    (["session", "create", "-e", "FOO", "--", "true"], "--env 'FOO' is not NAME=VALUE"),
    (["session", "create", "-e", "=x", "--", "true"], "is not NAME=VALUE"),
    (["session", "create", "-l", "nolabel", "--", "true"], "'nolabel' is not key=value"),
    (["session", "create", "-s", "nolabel", "--", "true"], "'nolabel' is not key=value"),
    (["service", "create", "s1", "-e", "FOO", "--", "true"], "--env 'FOO' is not NAME=VALUE"),
    (["service", "create", "s1", "-l", "x", "--", "true"], "'x' is not key=value"),
    (["service", "create", "s1", "-s", "x", "--", "true"], "'x' is not key=value"),
    (["run", "-n", "node-1", "-e", "FOO", "--", "true"], "--env 'FOO' is not NAME=VALUE"),
    (["run", "-l", "x", "--", "true"], "'x' is not key=value"),
    (["copy", "-l", "x", "/etc/hostname", "/tmp/x"], "'x' is not key=value"),
    (["rcopy", "-l", "x", "/etc/hostname", "/tmp"], "'x' is not key=value"),
    (["agent", "-l", "x", "--name", "never"], "'x' is not key=value"),
])
def test_bad_env_or_label_is_refused_and_creates_nothing(fleet: Fleet, args: list[str],
                                                         fragment: str) -> None:
    before = session_ids(fleet)
    r = fleet.shoal(*args, timeout=20)
    assert r.returncode == 2 and fragment in r.stderr, (args, r.stderr)
    assert r.stderr.startswith("shoal: ") and "Traceback" not in r.stderr
    assert session_ids(fleet) == before
    assert "s1" not in [v["name"] for v in as_json(fleet, "service", "list")]


# ---------------------------------------------------------------------- exit statuses


def test_exit_code_table() -> None:
    assert exit_code(ConfigError("x")) == 2
    assert [exit_code(e("x")) for e in (NotFoundError, AuthError, ConnectError,
                                        ValidationError, ShoalError)] == [1] * 5
    assert exit_code(Unavailable("x", 1.0)) == 1


def test_exit_statuses_of_errors(fleet: Fleet, tmp_path: Path) -> None:
    r = fleet.shoal("session", "show", "s-000000000000")
    assert r.returncode == 1 and r.stderr.startswith("shoal: no session"), r.stderr
    r = fleet.shoal("--url", "http://127.0.0.1:9", "session", "list")
    assert r.returncode == 1 and "cannot reach the controller" in r.stderr
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "client.toml").write_text("url = [\n")
    r = fleet.shoal("session", "list", env={"SHOAL_HOME": str(home)})
    assert r.returncode == 2 and "cannot read config" in r.stderr, r.stderr
    r = fleet.shoal("service", "create", "Bad_Name", "--", "true")  # checked here: 2
    assert r.returncode == 2 and "bad service name" in r.stderr
    r = fleet.shoal("session", "create", "--timeout", "-1", "--", "true")
    assert r.returncode == 2 and "bad session spec" in r.stderr, r.stderr


def test_ctrl_c_on_a_followed_log_exits_130(fleet: Fleet) -> None:
    sid = fleet.shoal("session", "create", "--shell",
                      "while :; do echo tick; sleep 0.1; done").stdout.strip()
    p = subprocess.Popen([SHOAL, "logs", "-f", sid], env=fleet.env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == b"tick\n"
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130 and b"Traceback" not in err, err
    assert fleet.shoal("session", "rm", sid).returncode == 0


# ---------------------------------------------------------------------- start-up


def test_run_imports_neither_aiohttp_nor_asyncio(fleet: Fleet) -> None:
    """`shoal run`'s start-up is its latency: the WebSocket of its own, not the client, and
    none of the other commands' modules (``_load_commands``)."""
    r = subprocess.run([sys.executable, "-X", "importtime", str(SHOAL), "run", "-n", "node-1",
                        "--", "echo", "hi"], env=fleet.env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout == "node-1: hi\n", r.stderr
    loaded = set(re.findall(r"^import time:.*\| +([\w.]+)$", r.stderr, re.M))
    assert "shoal.cli.run_cmd" in loaded, r.stderr  # the probe sees what run imports
    assert {m.split(".")[0] for m in loaded} & {"aiohttp", "asyncio", "rich", "nats"} == set()
    assert {m for m in loaded if m.endswith("_cmds") or m.endswith("_cmd")} == {
        "shoal.cli.run_cmd"}


# ---------------------------------------------------------------------- SyncClient


def test_sync_client_survives_an_interrupted_call(fleet: Fleet) -> None:
    """Ctrl-C in the middle of a blocking call (here: waiting for the next line of a
    followed log) stops that call; the iterator then closes cleanly and the client goes on
    working, as `shoal logs -f` needs."""
    with SyncClient(fleet.url, fleet.token) as c:
        r = c.create_session(SessionSpec(shell="echo first; sleep 300"))
        for _ in range(5):  # the interrupt lands at different points of the wait
            events = c.logs(r.id, follow=True)
            got = next(e for e in events if isinstance(e, LogChunk))
            assert got.data == b"first\n"
            main = threading.main_thread().ident
            assert main is not None
            timer = threading.Timer(0.2, signal.pthread_kill, (main, signal.SIGINT))
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                next(events)  # nothing more comes: blocked until interrupted
            events.close()
        assert c.session(r.id).state == "running"
        c.remove(r.id)
