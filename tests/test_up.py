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


def test_sigusr1_writes_what_each_task_waits_on_and_up_goes_on(tmp_path: Path) -> None:
    """A stuck `shoal up` (or agent, or controller) tells what it waits on: every task's
    await chain and every thread's stack, in its log; then it keeps serving."""
    fleet = Fleet(tmp_path / "home", agents=1).start()
    try:
        assert fleet.up is not None
        fleet.up.send_signal(signal.SIGUSR1)
        text = wait_for(lambda: "=== end of stacks" in (t := fleet.log.read_text()) and t)
        dump = text[text.index("=== shoal: stacks"):]
        assert "--- task " in dump and "in run_up" in dump  # the main task, by its coroutine
        assert "await stop.wait()" in dump  # down to the line it waits on
        assert "Current thread" in dump or "Thread 0x" in dump  # the threads too
        r = fleet.shoal("run", "-n", "node-1", "--", "echo", "still")
        assert (r.returncode, r.stdout) == (0, "node-1: still\n"), r.stderr
    finally:
        fleet.stop()


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


def _creds(home: Path) -> dict[str, list[str]]:
    """Each credential `shoal up`'s agents hold: its file name -> the nodes it names."""
    from shoal.identity import claims
    from shoal.identity.authority import node_names

    found = {}
    for path in sorted((home / "agent-state" / "identity").glob("*.creds")):
        assert (os.stat(path).st_mode & 0o777) == 0o600, path
        found[path.name] = node_names(claims.parse_creds(path.read_text()).jwt)
    return found


def test_up_agents_hold_a_credential_of_their_own_node(fleet: Fleet) -> None:
    """Node identities by default: each local agent enrolled with the join token, through
    the controller's enrollment, and holds a credential that names its own node only."""
    import tomllib

    from shoal.identity import claims

    creds = _creds(fleet.home)
    assert creds["node-1.creds"] == ["node-1"] and creds["node-2.creds"] == ["node-2"]
    for name, other in (("node-1", "node-2"), ("node-2", "node-1")):
        jwt = claims.decode(claims.parse_creds(
            (fleet.home / "agent-state" / "identity" / f"{name}.creds").read_text()).jwt)
        allowed = " ".join(jwt["nats"]["pub"]["allow"] + jwt["nats"]["sub"]["allow"])
        assert f"shoal.agent.{name}." in allowed and other not in allowed
        assert jwt["exp"] > jwt["iat"]  # it expires (and is renewed)
    up_log = fleet.log.read_text()
    assert "enrolled node-1 " in up_log and "enrolled node-2 " in up_log
    # No password anywhere: the server is in operator mode, the agents' config has a join
    # token for more agents and no NATS secret.
    conf = tomllib.loads((fleet.home / "agent.toml").read_text())
    assert "password" not in conf["nats"] and conf["join_token"].startswith("shoal-join_")
    assert '"operator"' in (fleet.home / "nats" / "nats.conf").read_text()
    r = fleet.shoal("run", "-n", "node-1,node-2", "--", "echo", "own-credential")
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["node-1: own-credential", "node-2: own-credential"]
    r = fleet.shoal("session", "create", "--node", "node-2", "--", "echo", "in-a-session")
    assert r.returncode == 0, r.stderr
    sid = r.stdout.strip()
    wait_for(lambda: fleet.shoal("logs", sid).stdout == "in-a-session\n", timeout=20)


def test_many_agents_share_a_few_credentials(tmp_path: Path) -> None:
    """Past 16 agents `shoal up` packs them 16 credentials' worth (each agent host has a
    keeper and a connection of its own): `--agents 20` is 10 hosts of 2 nodes each."""
    fleet = Fleet(tmp_path / "home", agents=20).start(timeout=60)
    try:
        assert _creds(fleet.home) == {f"node-{i}.creds": [f"node-{i}", f"node-{i + 1}"]
                                      for i in range(1, 21, 2)}
        r = fleet.shoal("run", "--all", "--", "echo", "each")
        assert r.returncode == 0, r.stderr
        assert sorted(r.stdout.splitlines()) == sorted(f"node-{i}: each" for i in range(1, 21))
    finally:
        fleet.stop()


def test_an_agent_of_64_virtual_nodes_holds_one_credential(fleet: Fleet) -> None:
    """The most one credential names (its JWT, ~45 KB, rides in the CONNECT line); one more
    is refused before anything is sent, saying what to do instead."""
    from shoal.wire.enrollment import MAX_NAMES

    prefix = "x" * (63 - len(str(MAX_NAMES)))  # the longest names there are
    names = [f"{prefix}{i}" for i in range(1, MAX_NAMES + 1)]
    agent = fleet.spawn("agent", "--virtual", str(MAX_NAMES), "--prefix", prefix,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        fleet.wait_nodes([names[0], names[-1]], timeout=60)
        assert _creds(fleet.home)[f"{names[0]}.creds"] == names
        r = fleet.shoal("run", "-n", names[-1], "--", "echo", "last")
        assert r.returncode == 0 and r.stdout == f"{names[-1]}: last\n", r.stderr
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(30)
    r = fleet.shoal("agent", "--virtual", str(MAX_NAMES + 1), "--prefix", "y-", timeout=40)
    assert r.returncode == 2, r.stderr
    assert f"at most {MAX_NAMES} nodes, not {MAX_NAMES + 1}" in r.stderr, r.stderr
    assert "--shared-agent-user" in r.stderr
    assert not (fleet.home / "agent-state" / "identity" / "y-1.creds").exists()


def test_too_many_agents_for_node_identities_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    r = subprocess.run([SHOAL, "up", "--agents", "1100", "--port", "0"], capture_output=True,
                       text=True, timeout=60, env={**env, "SHOAL_HOME": str(home)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "--agents 1024 or fewer" in r.stderr and "--shared-agent-user" in r.stderr, r.stderr
    assert os.listdir(home) == [], "nothing was written"


def test_the_shared_agent_user_stays_when_asked_for(tmp_path: Path) -> None:
    """`--shared-agent-user` (for virtual fleets larger than a credential names): the
    password mode of before, kept by the home; a home with node identities never goes
    back to it."""
    import tomllib

    home = tmp_path / "home"
    for args in (("--shared-agent-user",), ()):
        fleet = Fleet(home, agents=1, extra_args=args).start()
        try:
            conf = tomllib.loads((home / "agent.toml").read_text())
            assert conf["nats"]["user"] == "agent" and not conf.get("join_token")
            assert not (home / "identity").exists()
            assert "note: " in fleet.log.read_text()  # says what it means
            r = fleet.shoal("run", "-n", "node-1", "--", "echo", "shared")
            assert (r.returncode, r.stdout) == (0, "node-1: shared\n"), r.stderr
        finally:
            fleet.stop()
    other = tmp_path / "other"
    Fleet(other, agents=0).start().stop()  # node identities
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    r = subprocess.run([SHOAL, "up", "--agents", "0", "--port", "0", "--shared-agent-user"],
                       capture_output=True, text=True, timeout=60,
                       env={**env, "SHOAL_HOME": str(other)})
    assert r.returncode == 2 and "never goes back to the shared agent user" in r.stderr, \
        r.stderr
