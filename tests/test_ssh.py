"""ssh targets: real OpenSSH servers in network namespaces, beside a real fleet's agents."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet import SHOAL, Fleet, Terminal
from shoal.ssh.targets import Inventory, parse_hosts, parse_inventory, remote_command
from shoal.wire import messages as m
from sshnet import SshHost, client_home, keygen, public_key_line, ssh_hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

GOOD = ["s1", "s2", "s3"]
TRICKY = ["a b", "it's", '"q"', "$HOME", "`id`", "x\ny", "é☃", "", "-n", "*"]


class Env:
    def __init__(self, fleet: Fleet, hosts: dict[str, SshHost], root: Path) -> None:
        self.fleet = fleet
        self.hosts = hosts
        self.root = root
        self.home = client_home(root, hosts, [*GOOD, "refuse"], root / "hosts" / "id_ed25519")
        # changedkey: known_hosts lists a key the server does not have
        other = root / "not-the-host-key"
        if not other.exists():
            keygen(other, "impostor")
        with open(self.home / ".ssh" / "known_hosts", "a") as f:
            f.write(f"{hosts['changedkey'].address} {public_key_line(other)}\n")
        self.env = {**fleet.env, "HOME": str(self.home)}

    def shoal(self, *args: str, input: str | bytes | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        text = not isinstance(input, bytes)
        return subprocess.run([SHOAL, *args], input=input, capture_output=True, text=text,
                              env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("ssh")
    fleet = Fleet(root / "home", agents=2).start()
    try:
        with ssh_hosts(root / "hosts", authorized=[*GOOD, "changedkey"],
                       refusing=["refuse"], down=["down"]) as hosts:
            yield Env(fleet, hosts, root)
    finally:
        fleet.stop()
    assert not subprocess.run(["ip", "netns", "list"], capture_output=True,
                              text=True).stdout.count(f"shs{os.getpid() % 100000}-")


def lines(text: str) -> list[str]:
    return sorted(text.splitlines())


# ------------------------------------------------------------------ pure


def test_remote_command_quotes_every_word_for_a_posix_shell() -> None:
    spec = m.RunSpec(argv=["printf", "%s|\\n", *TRICKY], env={"A_B": "1 2"}, cwd="/t m p")
    line = remote_command(spec)
    got = subprocess.run(["sh", "-c", line.replace("cd -- '/t m p' || exit 1; ", "")],
                         capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert got.stdout == "".join(f"{w}|\n" for w in TRICKY)
    assert line.startswith("export A_B='1 2'; cd -- '/t m p' || exit 1; exec printf ")


def test_hosts_specs_and_inventory() -> None:
    inv = parse_inventory({"defaults": {"user": "ops"},
                           "hosts": {"web[1-2]": {"address": "{node}.dc.example", "port": 2222},
                                     "bastion": {"address": "203.0.113.7", "user": "jump"}}})
    got = parse_hosts("root@web[1-2],db[1-2].example:2200,bastion", inv)
    assert [(t.name, t.address, t.user, t.port) for t in got] == [
        ("web1", "web1.dc.example", "root", 2222), ("web2", "web2.dc.example", "root", 2222),
        ("db1.example", "db1.example", None, 2200), ("db2.example", "db2.example", None, 2200),
        ("bastion", "203.0.113.7", "jump", None)]
    for bad in ({"hosts": {"a": {"colour": "red"}}}, {"hosts": {"a": {"port": 70000}}},
                {"nodes": {}}, {"hosts": {"a[": {}}}):
        with pytest.raises(Exception, match="inventory"):
            parse_inventory(bad)
    with pytest.raises(Exception, match="port"):
        parse_hosts("a:99999", Inventory())


def test_ssh_slices_are_the_controllers() -> None:
    from shoal.controller.fanout import Roll
    from shoal.ssh.fanout import roll_slices

    for n in (0, 1, 7, 100):
        nodes = [f"h{i}" for i in range(n)]
        for batch, percent in ((0, 0), (1, 0), (3, 0), (0, 25), (0, 100), (200, 0)):
            assert roll_slices(nodes, batch, percent) == Roll(batch, percent).slices(nodes)


# ------------------------------------------------------------------ real hosts


def test_mixed_run_agents_and_ssh_hosts_exact_argv(net: Env) -> None:
    r = net.shoal("run", "-n", "node-[1-2]", "-H", "s[1-3]", "--", "printf", "%s|\\n",
                  *TRICKY)
    assert r.returncode == 0, r.stderr
    want = sorted(f"{n}: {line}" for n in ["node-1", "node-2", *GOOD]
                  for w in TRICKY for line in f"{w}|".split("\n"))
    assert lines(r.stdout) == want


def test_stdout_stderr_apart_exit_codes_and_json(net: Env) -> None:
    script = 'echo out; echo err >&2; exit "$1"'
    r = net.shoal("run", "-n", "node-1", "-H", "s1,s2", "--", "sh", "-c", script, "x", "3")
    assert r.returncode == 3
    assert lines(r.stdout) == ["node-1: out", "s1: out", "s2: out"]
    assert "s1: err" in r.stderr and "node-1: err" in r.stderr
    assert "exit 3: node-1,s[1-2]" in r.stderr
    r = net.shoal("run", "--json", "-n", "node-2", "-H", "s3", "--", "sh", "-c", script, "x",
                  "0")
    recs = {d["node"]: d for d in map(json.loads, r.stdout.splitlines())}
    assert set(recs) == {"node-2", "s3"} and r.returncode == 0
    assert recs["s3"]["stdout"] == "out\n" and recs["s3"]["stderr"] == "err\n"
    assert recs["s3"]["exit_code"] == 0 and recs["s3"]["reachable"]


def test_stdin_reaches_every_host_with_eof(net: Env) -> None:
    data = "line one\nzwei é\n" * 1000
    r = net.shoal("run", "--stdin", "-n", "node-1", "-H", "s[1-3]", "--", "sha256sum",
                  input=data)
    assert r.returncode == 0, r.stderr
    import hashlib

    digest = hashlib.sha256(data.encode()).hexdigest()
    assert lines(r.stdout) == sorted(f"{n}: {digest}  -" for n in ["node-1", *GOOD])


def test_gather_and_timeout(net: Env) -> None:
    r = net.shoal("run", "-b", "-n", "node-[1-2]", "-H", "s[1-3]", "--", "echo", "same")
    assert r.returncode == 0, r.stderr
    assert "node-[1-2],s[1-3] (5)" in r.stdout and r.stdout.count("same") == 1
    r = net.shoal("run", "--timeout", "1", "-H", "s1", "-n", "node-1", "--", "sleep", "30",
                  timeout=30)
    assert r.returncode == 255
    assert "s1: timed out after 1s" in r.stderr and "timed out: node-1,s1" in r.stderr


def test_batch_stops_after_a_failed_slice(net: Env) -> None:
    r = net.shoal("run", "--batch", "1", "-H", "s[1-3]", "--", "false")
    assert r.returncode == 1
    assert "not run (slice 1 of 3 failed on s1" in r.stderr
    r = net.shoal("run", "--fanout", "1", "-H", "s[1-3]", "--", "true")
    assert r.returncode == 0, r.stderr


def test_tty_over_ssh(net: Env) -> None:
    term = Terminal([SHOAL, "run", "-t", "-H", "s1", "--", "sh"], env=net.env, rows=33,
                    cols=111)
    try:
        term.write(b"stty size; tty; echo done$((1+1))\r")
        seen = term.read_until(b"done2")
        assert b"33 111" in seen and b"/dev/pts/" in seen
        term.write(b"exit 7\r")
        assert term.proc.wait(20) == 7
    finally:
        term.close()


def test_bad_hosts_are_named_with_255_and_the_others_fine(net: Env) -> None:
    r = net.shoal("run", "-n", "node-1", "-H", "s1,changedkey,refuse,down,unknown",
                  "--connect-timeout", "5", "--", "echo", "hi")
    # "unknown": a name that neither ~/.ssh/config nor the resolver knows
    assert r.returncode == 255
    assert lines(r.stdout) == ["node-1: hi", "s1: hi"]
    err = r.stderr
    assert "changedkey: unreachable: host key changed: 10.77." in err
    assert "ssh-keygen -R" in err
    assert "refuse: unreachable: permission denied (publickey)" in err
    assert "down: unreachable: connection refused" in err
    assert "unknown: unreachable: unknown host unknown" in err
    assert "unreachable: changedkey,down,refuse,unknown" in err


def test_unknown_host_keys_are_refused_unless_accepted(net: Env, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    s2 = net.hosts["s2"]
    r = net.shoal("run", "--known-hosts", str(known), "-H", "s2", "--", "true")
    assert r.returncode == 255
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", str(s2.host_key)],
                                 capture_output=True, text=True).stdout.split()[1]
    assert f"s2: unreachable: unknown host key: {s2.address} offers ssh-ed25519 " \
           f"{fingerprint}" in r.stderr
    assert "--accept-new-host-keys" in r.stderr and known.read_text() == ""
    r = net.shoal("run", "--known-hosts", str(known), "--accept-new-host-keys", "-H", "s2",
                  "--", "true")
    assert r.returncode == 0, r.stderr
    assert known.read_text() == s2.known_hosts_line()
    r = net.shoal("run", "--known-hosts", str(known), "-H", "s2", "--", "true")
    assert r.returncode == 0, r.stderr
    # a changed key is refused even with --accept-new-host-keys
    r = net.shoal("run", "--accept-new-host-keys", "-H", "changedkey", "--", "true")
    assert r.returncode == 255 and "host key changed" in r.stderr


def test_inventory_names_in_node_sets(net: Env, tmp_path: Path) -> None:
    inv = tmp_path / "inventory.toml"
    inv.write_text(f'[defaults]\nuser = "root"\n\n[hosts."web[1-2]"]\n'
                   f'address = "{net.hosts["s1"].address}"\n\n'
                   f'[hosts.db]\naddress = "{net.hosts["s3"].address}"\nport = 22\n')
    r = net.shoal("run", "--inventory", str(inv), "-n", "node-2,web[1-2],db", "-x", "web2",
                  "--", "hostname")
    assert r.returncode == 0, r.stderr
    assert [ln.split(":")[0] for ln in lines(r.stdout)] == ["db", "node-2", "web1"]
    r = net.shoal("run", "--inventory", str(tmp_path / "nope.toml"), "-H", "x", "--", "true")
    assert r.returncode == 2 and "no inventory at" in r.stderr


def test_the_configs_known_hosts_file_is_the_one_read(net: Env, tmp_path: Path) -> None:
    # ~/.ssh/config's UserKnownHostsFile, not ~/.ssh/known_hosts (here: none at all)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    named = tmp_path / "elsewhere_known_hosts"
    named.write_text(net.hosts["s1"].known_hosts_line())
    (home / ".ssh" / "config").write_text(f"UserKnownHostsFile {named}\n"
                                          + (net.home / ".ssh" / "config").read_text())
    r = subprocess.run([SHOAL, "run", "-H", "s1", "--", "echo", "hi"], capture_output=True,
                       text=True, env={**net.env, "HOME": str(home)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "s1: hi\n"
    assert not (home / ".ssh" / "known_hosts").exists()


def test_an_inventory_jump_host_carries_the_connection(net: Env, tmp_path: Path) -> None:
    # s1 reached through s1: its sshd then sees the connection come from its own address
    # (a direct one comes from this side of the veth pair)
    s1 = net.hosts["s1"]
    inv = tmp_path / "inventory.toml"
    inv.write_text(f'[hosts.viajump]\naddress = "{s1.address}"\nuser = "root"\n'
                   f'jump = "s1"\n\n[hosts.direct]\naddress = "{s1.address}"\n'
                   'user = "root"\n')
    r = net.shoal("run", "--inventory", str(inv), "-n", "viajump,direct", "--",
                  "printenv", "SSH_CONNECTION")
    assert r.returncode == 0, r.stderr
    seen = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert seen["viajump"].split()[0] == s1.address
    assert seen["direct"].split()[0] == s1.address.rsplit(".", 1)[0] + ".1"


def test_a_named_identity_is_offered_before_an_agents_other_keys(net: Env,
                                                                 tmp_path: Path) -> None:
    # an ssh agent with more keys than the server's MaxAuthTries (6), none of them the one
    # the inventory names: that one must still be tried
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        env = {**net.env, "SSH_AUTH_SOCK": str(sock)}
        for i in range(8):
            keygen(tmp_path / f"other{i}", f"other-{i}")
            for _ in range(100):
                if subprocess.run(["ssh-add", "-q", str(tmp_path / f"other{i}")], env=env,
                                  capture_output=True).returncode == 0:
                    break
                import time
                time.sleep(0.05)
            else:
                raise AssertionError("ssh-add failed")
        inv = tmp_path / "inventory.toml"
        inv.write_text(f'[hosts.keyed]\naddress = "{net.hosts["s2"].address}"\n'
                       f'user = "root"\nidentity = "{net.root / "hosts" / "id_ed25519"}"\n')
        r = subprocess.run([SHOAL, "run", "--inventory", str(inv), "-n", "keyed", "--",
                            "echo", "hi"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "keyed: hi\n"
    finally:
        agent.terminate()
        agent.wait(10)


# ------------------------------------------------------------------ copy over SFTP


def test_copy_and_rcopy_over_sftp_beside_agents(net: Env, tmp_path: Path) -> None:
    import hashlib

    src = tmp_path / "app conf.bin"
    data = os.urandom(300_000) + "é\n".encode()
    src.write_bytes(data)
    src.chmod(0o640)
    os.utime(src, (1_600_000_000, 1_600_000_000))
    # every host here shares this machine's file system: one directory per node
    dest = tmp_path / "dest-{node}"
    for n in ["node-1", *GOOD]:
        Path(str(dest).replace("{node}", n)).mkdir()
    r = net.shoal("cp", "-n", "node-1", "-H", "s[1-3]", "--", str(src), str(dest))
    assert r.returncode == 0, r.stderr
    for n in ["node-1", *GOOD]:
        got = Path(str(dest).replace("{node}", n)) / src.name
        assert got.read_bytes() == data
        assert got.stat().st_mode & 0o777 == 0o640 and got.stat().st_mtime == 1_600_000_000
        assert [p.name for p in got.parent.iterdir()] == [src.name]  # no temporary left
    r = net.shoal("cp", "-H", "s1,down", "--", str(src), str(tmp_path / "no-such" / "x"))
    assert r.returncode == 255
    assert "s1: no such directory:" in r.stderr and "down: unreachable" in r.stderr

    out = tmp_path / "gathered"
    out.mkdir()
    source = str(dest / src.name)
    r = net.shoal("rcp", "-n", "node-1", "-H", "s[1-2]", "--", source, str(out))
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{src.name}.{n}" for n in ["node-1", "s1", "s2"])
    for name in names:
        got = out / name
        assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert got.stat().st_mode & 0o777 == 0o640 and got.stat().st_mtime == 1_600_000_000
    r = net.shoal("rcp", "--max-size", "1K", "-H", "s3", "--", source, str(out))
    assert r.returncode == 3 and "over the --max-size" in r.stderr
    assert not (out / f"{src.name}.s3").exists()


def test_copy_a_tree_over_ssh_beside_agents(net: Env, tmp_path: Path) -> None:
    from shoal.logic import treecopy

    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(os.urandom(70_000))
    (src / "sub" / "f").chmod(0o600)
    (src / "link").symlink_to("sub/f")
    (src / "out").symlink_to("/etc/passwd")
    os.utime(src / "sub", (1_600_000_000, 1_600_000_000))
    dest = tmp_path / "dest-{node}"
    for n in ["node-1", *GOOD[:2]]:
        Path(str(dest).replace("{node}", n)).mkdir()
    r = net.shoal("cp", "-r", "-n", "node-1", "-H", "s[1-2]", "--", str(src), str(dest))
    assert r.returncode == 0, r.stderr
    for n in ["node-1", *GOOD[:2]]:
        got = Path(str(dest).replace("{node}", n)) / "tree"
        assert treecopy.listing(got) == treecopy.listing(src), n
    r = net.shoal("cp", "-r", "-H", "s1", "--", str(src), str(tmp_path / "none" / "x"))
    assert r.returncode != 0 and "s1: no such directory" in r.stderr, r.stderr


def test_rcopy_a_tree_over_ssh_beside_agents(net: Env, tmp_path: Path) -> None:
    from shoal.logic import treecopy

    for n in ["node-1", *GOOD[:2]]:
        src = tmp_path / n / "tree"
        (src / "sub").mkdir(parents=True)
        (src / "sub" / "f").write_bytes(os.urandom(70_000) + n.encode())
        (src / "out").symlink_to("/etc/passwd")
        os.utime(src / "sub", (1_600_000_000, 1_600_000_000))
    out = tmp_path / "got"
    out.mkdir()
    r = net.shoal("rcp", "-r", "-n", "node-1", "-H", "s[1-2]", "--",
                  f"{tmp_path}/{{node}}/tree", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["tree.node-1", "tree.s1", "tree.s2"]
    for n in ["node-1", *GOOD[:2]]:
        assert treecopy.listing(out / f"tree.{n}") == treecopy.listing(tmp_path / n / "tree")
    r = net.shoal("rcp", "-r", "-H", "s3", "--", f"{tmp_path}/{{node}}/tree", str(out))
    assert r.returncode == 2 and f"s3: not a directory: {tmp_path}/s3/tree" in r.stderr
