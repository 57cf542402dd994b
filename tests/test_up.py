"""``shoal up`` as a user runs it: one command up, Ctrl-C/SIGTERM down, nothing left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from fleet import Fleet, wait_for


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_up_stops_everything_it_started(tmp_path: Path, sig: int) -> None:
    fleet = Fleet(tmp_path / "home", agents=1).start()
    run = fleet.spawn("run", "-n", "node-1", "--", "sleep", "303",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert fleet.up is not None
    up = psutil.Process(fleet.up.pid)
    children = wait_for(lambda: [p for p in up.children(recursive=True)
                                 if "303" in " ".join(p.cmdline())] and up.children(recursive=True))
    assert any(p.name() == "nats-server" for p in children)
    port = int(fleet.url.rsplit(":", 1)[1])
    if sig == signal.SIGINT:  # Ctrl-C at a terminal: the whole foreground group gets it
        os.killpg(fleet.up.pid, sig)
    else:
        fleet.up.send_signal(sig)
    assert fleet.up.wait(30) == 0
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    run.communicate(timeout=20)
    assert run.returncode != 0


def test_every_command_finds_the_fleet_without_flags(fleet: Fleet) -> None:
    """client.toml and agent.toml let plain `shoal ...` commands join the local fleet."""
    agent = fleet.agent("extra-1")
    r = fleet.shoal("run", "-n", "extra-1,node-1", "--", "echo", "hi")
    assert r.returncode == 0 and sorted(r.stdout.splitlines()) == ["extra-1: hi", "node-1: hi"]
    virtual = fleet.spawn("agent", "--virtual", "3", "--prefix", "v-",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fleet.wait_nodes(["v-1", "v-2", "v-3"])
    r = fleet.shoal("run", "-n", "v-[1-3]", "--", "echo", "virtual")
    assert sorted(r.stdout.splitlines()) == [f"v-{i}: virtual" for i in (1, 2, 3)]
    for p in (agent, virtual):
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0


def test_up_stops_even_when_nats_died_first(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path / "home", agents=1).start()
    fleet.shoal("session", "create", "--", "sleep", "304")
    assert fleet.up is not None
    up = psutil.Process(fleet.up.pid)
    sleeper = wait_for(lambda: [p for p in up.children(recursive=True)
                                if "304" in " ".join(p.cmdline())])[0]
    nats_server = [p for p in up.children() if p.name() == "nats-server"][0]
    nats_server.kill()
    fleet.up.send_signal(signal.SIGTERM)
    assert fleet.up.wait(60) == 0
    assert not sleeper.is_running() or sleeper.status() == psutil.STATUS_ZOMBIE
