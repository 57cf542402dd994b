"""``shoal up`` as a user runs it: one command up, Ctrl-C/SIGTERM down, nothing left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import psutil
import pytest

from fleet import SHOAL, Fleet, wait_for


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


def start_up(home: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    return subprocess.Popen([SHOAL, "up", "--agents", "0", "--port", "0"],
                            env={**env, "SHOAL_HOME": str(home), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("case", ["group-writable", "world-writable", "someone-else's"])
def test_up_refuses_a_home_others_control(tmp_path: Path, case: str) -> None:
    """$SHOAL_HOME holds the fleet's secrets: one that others may write to (or own) could
    have them read or swapped, so `shoal up` says what is wrong and starts nothing."""
    home = tmp_path / "home"
    home.mkdir()
    if case == "someone-else's":
        os.chmod(home, 0o700)
        os.chown(home, 65534, 65534)
    else:
        os.chmod(home, 0o770 if case == "group-writable" else 0o777)
    up = start_up(home)
    try:
        _, err = up.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGTERM)
        up.communicate(timeout=30)
        raise AssertionError(f"shoal up ran with a {case} SHOAL_HOME") from None
    assert up.returncode == 2, err
    assert str(home) in err and ("chmod" in err or "belongs to uid 65534" in err), err
    assert os.listdir(home) == [], "nothing was written there"


def test_a_new_home_is_private(tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"
    up = start_up(home)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "shoal is up" in line:
                break
        else:
            raise AssertionError(up.communicate(timeout=30))
        assert (os.stat(home).st_mode & 0o777) == 0o700
        for name in ("up.toml", "controller.toml", "client.toml", "agent.toml"):
            assert (os.stat(home / name).st_mode & 0o777) == 0o600, name
        assert not [n for n in os.listdir(home) if n.endswith(".tmp")]
    finally:
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=30)
    assert up.returncode == 0


def test_secret_files_are_never_written_through_a_planted_link(tmp_path: Path) -> None:
    from shoal import config

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    for planted in ("client.toml.tmp", "client.toml"):
        (home / planted).symlink_to(target)
    config.write_secret_file(home / "client.toml", "token = 'secret'\n")
    assert target.read_text() == "untouched\n"
    assert (home / "client.toml").read_text() == "token = 'secret'\n"
    assert not (home / "client.toml").is_symlink()
    assert (os.stat(home / "client.toml").st_mode & 0o777) == 0o600
    assert sorted(os.listdir(home)) == ["client.toml", "client.toml.tmp"]
