"""Network policy for throwaway users (agent/netpolicy.py): the rule text, pure; then the
attack on a real fleet: a socket of a throwaway UID connecting to the node's NATS port, the
controller and another session's port is refused, while the agent's own user gets through;
and the table's life across stop, SIGKILL and restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import textwrap
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fleet import Fleet, wait_for, wait_running
from shoal.agent import netpolicy as np
from shoal.client.aio import Client, LogChunk
from shoal.config import AgentConfig, NatsConfig, load
from shoal.errors import ConfigError
from shoal.wire import messages as m

UIDS = np.parse_uid_range(AgentConfig().ephemeral_uids)
THROWAWAY = UIDS[0] + 4242  # a UID of the throwaway range, no account needed
OTHER = 65534  # nobody: not a throwaway user, so not confined
# The system Python: the test's own interpreter may live where other users cannot read.
PY = "/usr/bin/python3"

can_enforce = pytest.mark.skipif(np.unavailable() is not None or not os.path.exists(PY),
                                 reason=f"needs root, nft and {PY}: {np.unavailable()}")


# --------------------------------------------------------------------------- pure


def _policy(mode: np.Mode, deny: list[str] | None = None) -> np.Policy:
    return np.Policy(mode, (2000, 2999), "shoal_t_00", owner="agent t",
                     deny=np.parse_networks(deny or []))


def test_none_refuses_every_new_connection_of_the_range_only() -> None:
    text = np.ruleset(_policy("none"))
    assert "meta skuid 2000-2999 jump throwaway" in text
    assert np.rules(_policy("none")) == ["tcp flags syn / syn,ack reject with tcp reset",
                                         "meta l4proto != tcp drop"]
    # Recreate-on-start: declared, deleted and written again in one transaction.
    assert text.startswith("table inet shoal_t_00\ndelete table inet shoal_t_00\n")
    assert text.count("table inet shoal_t_00") == 3


def test_outbound_refuses_this_node_and_the_deny_list() -> None:
    r = np.rules(_policy("outbound", ["10.0.0.0/8", "192.0.2.7", "fd00::/8"]))
    assert r[0] == 'oif "lo" meta l4proto { tcp, udp } th dport 53 accept'
    assert 'oif "lo" tcp flags syn / syn,ack reject with tcp reset' in r
    assert 'oif "lo" meta l4proto != tcp drop' in r
    assert "ip daddr { 10.0.0.0/8, 192.0.2.7/32 } meta l4proto != tcp drop" in r
    assert "ip6 daddr { fd00::/8 } tcp flags syn / syn,ack reject with tcp reset" in r
    assert not any("jump" in x for x in r)


def test_open_only_removes_an_old_table() -> None:
    assert np.rules(_policy("open")) == []
    assert np.ruleset(_policy("open")) == np.removal("shoal_t_00")


def test_table_names_are_stable_distinct_and_valid(tmp_path: Path) -> None:
    a = np.table_name(tmp_path, "node-1")
    assert a == np.table_name(tmp_path, "node-1")
    assert a != np.table_name(tmp_path, "node-2")
    assert a != np.table_name(tmp_path / "other", "node-1")
    for name in ("node-1", "x" * 63, "a.b"):
        np.Policy("none", (2000, 2999), np.table_name(tmp_path, name))  # valid identifier


def test_comment_cannot_break_out_of_its_quotes() -> None:
    p = np.Policy("none", (2000, 2999), "shoal_t_00", owner='x" ; flush ruleset ; "\n')
    comment = [line for line in np.ruleset(p).splitlines() if "comment" in line]
    assert len(comment) == 1 and comment[0].count('"') == 2


def test_orphans_are_tables_whose_agent_state_is_gone(tmp_path: Path) -> None:
    live, gone = tmp_path / "live", tmp_path / "gone"
    live.mkdir()
    listing = "".join(
        np.ruleset(np.Policy("none", (2000, 2999), np.table_name(d, "n"), np.owner("n", d)))
        for d in (live, gone))
    listing += 'table inet someone_else {\n\tcomment "x; state /nonexistent"\n}\n'
    assert np.orphans(listing) == [np.table_name(gone, "n")]
    # A path that cannot be written back exactly is never named, so never collected.
    odd = tmp_path / 'a"b'
    assert "state" not in np.owner("n", odd)
    assert "state" not in np.owner("n", tmp_path / ("x" * 200))


@pytest.mark.parametrize("length", [40, 75, 81, 82, 120, 300])
def test_the_comment_fits_nftables_limit_and_keeps_the_state_while_it_can(
        tmp_path: Path, length: int) -> None:
    """The finding: a state directory of 72 characters (a test's temporary home) made the
    comment 129 bytes, nft refused the whole table, and the agent ran unconfined."""
    state = Path("/" + "s" * (length - 1))
    node = "node-" + "n" * 60
    for mode in np.MODES:
        p = np.Policy(mode, (2000, 2999), np.table_name(state, node), np.owner(node, state))
        listing = np.ruleset(p)
        comment = next((line for line in listing.splitlines() if "comment" in line), "")
        assert len(comment.strip().removeprefix("comment ").strip('"').encode()) <= 128
        kept = np.orphans(listing, exists=lambda _: False) == [p.table]
        assert kept == (length <= 81) or mode == "open"  # 128 - len("shoal: ...=outbound; state ")


@pytest.mark.parametrize("key,value,words", [
    ("ephemeral_network", '"everything"', "ephemeral_network"),
    ("ephemeral_uids", '"5-1"', "ephemeral_uids"),
    ("ephemeral_uids", '"lots"', "ephemeral_uids"),
    ("ephemeral_deny", '["10.0.0.0/33"]', "write it like 10.0.0.0/8"),
])
def test_bad_settings_are_refused_with_what_to_write(tmp_path: Path, key: str, value: str,
                                                    words: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"{key} = {value}\n")
    with pytest.raises(ConfigError) as e:
        load(AgentConfig, path)
    assert words in e.value.message and str(path) in e.value.message


def test_nats_addresses_are_resolved_from_the_url_list() -> None:
    got = np.nats_addresses("nats://127.0.0.1:4222, tls://[::1]:4223,localhost")
    assert {str(n) for n in got} >= {"127.0.0.1/32", "::1/128"}


async def test_outbound_also_refuses_the_agents_nats_servers(tmp_path: Path) -> None:
    cfg = AgentConfig(nats=NatsConfig(url="nats://192.0.2.50:4222,tls://[2001:db8::5]:4222"),
                      ephemeral_network="outbound", ephemeral_deny=["10.0.0.0/8"])
    p = await np.for_agent(cfg, tmp_path, "n")
    assert p.mode == "outbound" and p.uids == UIDS
    assert {str(n) for n in p.deny} == {"10.0.0.0/8", "192.0.2.50/32", "2001:db8::5/128"}
    assert p.table == np.table_name(tmp_path, "n") and str(tmp_path) in p.owner


@can_enforce
@pytest.mark.parametrize("mode", ["none", "outbound", "open"])
def test_nft_accepts_the_script(mode: np.Mode) -> None:
    long_state = Path("/var/lib/" + "a-long-state-directory/" * 3 + "agent-state")
    script = np.ruleset(_policy(mode, ["10.0.0.0/8", "fd00::/8"]))
    script += np.ruleset(np.Policy(mode, (2000, 2999), "shoal_t_01", np.owner("n", long_state)))
    r = subprocess.run(["nft", "-c", "-f", "-"], input=script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- real fleet


def _tables() -> list[str]:
    r = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True,
                       check=True)
    return [e["table"]["name"] for e in json.loads(r.stdout)["nftables"] if "table" in e]


def _table_text(name: str) -> str:
    r = subprocess.run(["nft", "list", "table", "inet", name], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else ""


PROBE = textwrap.dedent("""
    import socket, sys
    for where in sys.argv[1:]:
        host, _, port = where.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
            print(where, "connected")
        except OSError as e:
            print(where, type(e).__name__)
""")


def _connect_as(uid: int, *targets: int | str, netns: str = "") -> dict[int | str, str]:
    """Connect to each target (a port on 127.0.0.1, or "host:port") from a process of
    ``uid`` (in network namespace ``netns``); what happened to each."""
    where = [t if isinstance(t, str) else f"127.0.0.1:{t}" for t in targets]
    argv = [PY, "-c", PROBE, *where]
    if netns:
        argv = ["ip", "netns", "exec", netns, "setpriv", f"--reuid={uid}", f"--regid={uid}",
                "--clear-groups", *argv]
        r = subprocess.run(argv, cwd="/", capture_output=True, text=True, timeout=60)
    else:
        r = subprocess.run(argv, user=uid, group=uid, extra_groups=[], cwd="/",
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    seen = dict(line.split() for line in r.stdout.splitlines())
    return {t: seen[w] for t, w in zip(targets, where, strict=True)}


def _nats_port(fleet: Fleet) -> int:
    port = urlsplit(load(AgentConfig, fleet.home / "agent.toml").nats.url).port
    assert port is not None
    return port


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if np.unavailable() is not None:
        pytest.skip(f"network policy cannot be enforced here: {np.unavailable()}")
    f = Fleet(tmp_path_factory.mktemp("fleet") / "home", agents=1).start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[Client]:
    async with Client(fleet.url, fleet.token) as c:
        yield c


@can_enforce
async def test_throwaway_users_cannot_reach_nats_controller_or_sessions(
        fleet: Fleet, client: Client) -> None:
    assert fleet.nodes()["node-1"]["network"] == "none"
    # Another session with an allocated port ($PORT), listening on loopback.
    listener = await wait_running(client, (await client.create_session(m.SessionSpec(
        shell=f'exec {PY} -m http.server --bind 127.0.0.1 "$PORT"', ports=1,
        cwd="/"))).id)
    session_port = listener.ports[0]
    nats_port, ctl_port = _nats_port(fleet), urlsplit(fleet.url).port
    assert ctl_port is not None
    try:
        wait_for(lambda: _connect_as(os.getuid(), session_port)[session_port] == "connected",
                 timeout=30)
        ports = (nats_port, ctl_port, session_port)
        assert _connect_as(THROWAWAY, *ports) == {p: "ConnectionRefusedError" for p in ports}
        # The agent's own user (and any user outside the range) still gets through.
        assert _connect_as(os.getuid(), *ports) == {p: "connected" for p in ports}
        assert _connect_as(OTHER, *ports) == {p: "connected" for p in ports}
    finally:
        await client.remove(listener.id)


@can_enforce
async def test_a_throwaway_users_own_listener_still_answers(fleet: Fleet) -> None:
    server = subprocess.Popen(
        [PY, "-c", "import socket; s = socket.create_server(('127.0.0.1', 0)); "
                   "print(s.getsockname()[1], flush=True); c, _ = s.accept(); "
                   "c.sendall(b'hi'); c.close()"],
        user=THROWAWAY, group=THROWAWAY, extra_groups=[], cwd="/", stdout=subprocess.PIPE,
        text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            assert c.recv(2) == b"hi"
    finally:
        server.kill()
        server.wait()


@can_enforce
def test_rules_leave_with_the_agent_and_come_back_once_after_sigkill(fleet: Fleet) -> None:
    name = "np-extra"
    table = np.table_name(fleet.home / "agent-state", name)
    up_table = np.table_name(fleet.home / "agent-state", "node-1")
    agent = fleet.agent(name)
    assert table in _tables()
    first = _table_text(table)
    assert "jump throwaway" in first
    agent.send_signal(signal.SIGKILL)
    agent.wait(30)
    assert _table_text(table) == first, "after a crash the rules stay in force"
    agent = fleet.agent(name, wait=False)
    # The crashed agent's entry still says ready: wait for this process's own heartbeat.
    wait_for(lambda: fleet.nodes().get(name, {}).get("pid") == agent.pid, timeout=30)
    assert _tables().count(table) == 1 and _table_text(table) == first
    nats_port = _nats_port(fleet)
    assert _connect_as(THROWAWAY, nats_port) == {nats_port: "ConnectionRefusedError"}
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(60) == 0
    assert table not in _tables()
    assert up_table in _tables(), "another agent's stop leaves this one's table alone"
    assert _connect_as(THROWAWAY, nats_port) == {nats_port: "ConnectionRefusedError"}


@can_enforce
def test_an_agent_that_fails_to_start_leaves_no_rules(fleet: Fleet) -> None:
    name = "np-refused"
    # Without agent.toml's join token (node identities) it has only the wrong password.
    p = fleet.spawn("agent", "--name", name, env={"SHOAL_NATS_PASSWORD": "wrong",
                                                  "SHOAL_JOIN_URL": "", "SHOAL_JOIN_TOKEN": ""},
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = p.communicate(timeout=30)
    assert p.returncode != 0 and "refused the credentials" in err
    assert np.table_name(fleet.home / "agent-state", name) not in _tables()


@can_enforce
def test_an_agent_that_cannot_enforce_says_so(fleet: Fleet) -> None:
    name = "np-blind"
    # Without nft on its PATH the agent cannot install rules: it warns and reports it.
    path = ":".join(d for d in os.environ.get("PATH", "").split(":")
                    if d and not os.path.exists(os.path.join(d, "nft")))
    assert shutil.which("nft", path=path) is None
    agent = fleet.agent(name, env={"PATH": path})
    try:
        assert fleet.nodes()[name]["network"] == np.UNENFORCED
        r = fleet.shoal("nodes")
        assert r.returncode == 0 and f"{name} (unenforced)" in r.stderr
        log = (fleet.home / f"agent-{name}.log").read_text()
        assert "network policy NOT enforced (nft is not installed" in log
        req = urllib.request.Request(fleet.url + "/api/v1/terminal/info",
                                     headers={"Authorization": f"Bearer {fleet.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            warning = json.load(r)["warning"]
        assert name in warning and "NATS" in warning
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)


@can_enforce
async def test_a_real_ephemeral_session_cannot_reach_nats(fleet: Fleet, client: Client) -> None:
    nats_port = _nats_port(fleet)
    s = await client.create_session(m.SessionSpec(
        command=[PY, "-c", PROBE, f"127.0.0.1:{nats_port}"], user="ephemeral", cwd="/"))
    done = await client.wait(s.id, timeout=60)
    out = b"".join([e.data async for e in client.logs(done.id) if isinstance(e, LogChunk)])
    await client.remove(done.id)
    assert out.split() == [f"127.0.0.1:{nats_port}".encode(), b"ConnectionRefusedError"]


# --------------------------------------------------------------------------- outbound


SERVE = ("import socket\n"
         "s = socket.create_server(('0.0.0.0', 0)); print(s.getsockname()[1], flush=True)\n"
         "while True: s.accept()[0].close()\n")


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair: "node" (10.213.0.1) and "remote"
    (10.213.0.2 and 10.213.0.3), made and removed here; nothing leaves them."""
    tag = os.urandom(3).hex()
    node, remote = f"np-node-{tag}", f"np-remote-{tag}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", node)
    try:
        ip("netns", "add", remote)
        ip("-n", node, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
           "netns", remote)
        for ns, addrs in ((node, ["10.213.0.1/24"]), (remote, ["10.213.0.2/24",
                                                              "10.213.0.3/24"])):
            dev = "veth0" if ns == node else "veth1"
            for a in addrs:
                ip("-n", ns, "addr", "add", a, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield node, remote
    finally:
        subprocess.run(["ip", "netns", "del", remote], capture_output=True)
        subprocess.run(["ip", "netns", "del", node], capture_output=True)


def _serve(netns: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen(["ip", "netns", "exec", netns, PY, "-c", SERVE], cwd="/",
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


@can_enforce
@pytest.mark.parametrize("mode", ["none", "outbound"])
def test_outbound_reaches_other_hosts_but_not_this_node_or_the_deny_list(
        two_hosts: tuple[str, str], mode: np.Mode) -> None:
    node, remote = two_hosts
    policy = np.Policy(mode, UIDS, "shoal_test_outbound", deny=np.parse_networks(["10.213.0.3"]))
    subprocess.run(["ip", "netns", "exec", node, "nft", "-f", "-"], input=np.ruleset(policy),
                   text=True, check=True)
    here, here_port = _serve(node)
    there, there_port = _serve(remote)
    try:
        local = (here_port, f"10.213.0.1:{here_port}")  # loopback, and the node's own address
        remote_ok, denied = f"10.213.0.2:{there_port}", f"10.213.0.3:{there_port}"
        got = _connect_as(THROWAWAY, *local, remote_ok, denied, netns=node)
        assert got == {here_port: "ConnectionRefusedError",
                       f"10.213.0.1:{here_port}": "ConnectionRefusedError",
                       remote_ok: "connected" if mode == "outbound" else "ConnectionRefusedError",
                       denied: "ConnectionRefusedError"}
        everything = (*local, remote_ok, denied)
        assert _connect_as(OTHER, *everything, netns=node) == dict.fromkeys(everything,
                                                                            "connected")
    finally:
        for p in (here, there):
            p.kill()
            p.wait()


async def test_throwaway_users_cannot_gain_privileges(fleet: Fleet, client: Client) -> None:
    # A setuid program would open its sockets as its owner, outside the UID match.
    s = await client.create_session(m.SessionSpec(
        shell="grep NoNewPrivs /proc/self/status", user="ephemeral", cwd="/"))
    done = await client.wait(s.id, timeout=60)
    out = b"".join([e.data async for e in client.logs(done.id) if isinstance(e, LogChunk)])
    await client.remove(done.id)
    assert out.split() == [b"NoNewPrivs:", b"1"], (done.state, done.reason)
