"""Real OpenSSH servers on hosts of their own: one network namespace per host, joined to
this one by a veth pair (10.77.K.1 here, 10.77.K.2 there), each sshd with its own host key.
Everything is removed on exit, also when a test fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True, stdin=subprocess.DEVNULL)


def public_key_line(path: Path) -> str:
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


@dataclass
class SshHost:
    name: str
    netns: str
    address: str
    host_key: Path
    process: subprocess.Popen[bytes] | None = None
    home: Path = field(default_factory=Path)

    def known_hosts_line(self) -> str:
        return f"{self.address} {public_key_line(self.host_key)}\n"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def _netns(tag: str, k: int) -> Iterator[tuple[str, str]]:
    ns, veth = f"shs{tag}-{k}", f"shv{tag}{k}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("addr", "add", f"10.77.{k}.1/24", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"10.77.{k}.2/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, f"10.77.{k}.2"
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _sshd_config(root: Path, host: SshHost, auth_keys: Path) -> str:
    return "\n".join([
        "Port 22", f"ListenAddress {host.address}", f"HostKey {host.host_key}",
        f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {auth_keys}", "UsePAM no",
        "AuthenticationMethods publickey", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "StrictModes no", "MaxStartups 200:30:400", "MaxSessions 200", "UseDNS no",
        "Subsystem sftp internal-sftp", "LogLevel ERROR",
        # an empty HOME: the remote shell reads none of this machine's rc files
        f"SetEnv HOME={host.home}",
    ]) + "\n"


@contextmanager
def ssh_hosts(root: Path, authorized: list[str], refusing: list[str] = (),  # type: ignore[assignment]
              down: list[str] = (), first: int = 1) -> Iterator[dict[str, SshHost]]:  # type: ignore[assignment]
    """Hosts named ``authorized`` (accept the key in ``root/id_ed25519``), ``refusing``
    (an sshd that does not know that key) and ``down`` (an address with no sshd)."""
    root.mkdir(parents=True, exist_ok=True)
    if not Path(SSHD).exists():
        raise RuntimeError("no sshd: run scripts/test-deps.sh (Debian's openssh-server)")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    user_key = root / "id_ed25519"
    if not user_key.exists():
        keygen(user_key, "shoal-test-user")
    tag = str(os.getpid() % 100000)
    hosts: dict[str, SshHost] = {}
    with ExitStack() as stack:
        names = [*authorized, *refusing, *down]
        for k, name in enumerate(names, start=first):
            ns, addr = stack.enter_context(_netns(tag, k))
            hroot = root / name
            hroot.mkdir(exist_ok=True)
            host = SshHost(name, ns, addr, hroot / "ssh_host_ed25519_key", home=hroot / "home")
            host.home.mkdir(exist_ok=True)
            keygen(host.host_key, f"host-{name}")
            hosts[name] = host
            if name in down:
                continue
            auth = hroot / "authorized_keys"
            if name in refusing:
                other = hroot / "other_key"
                keygen(other, "someone-else")
                auth.write_text(public_key_line(other) + "\n")
            else:
                auth.write_text(public_key_line(user_key) + "\n")
            conf = hroot / "sshd_config"
            conf.write_text(_sshd_config(hroot, host, auth))
            log = open(hroot / "sshd.log", "wb")  # noqa: SIM115 - the child owns it
            host.process = subprocess.Popen(
                ["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            log.close()
            stack.callback(_stop, host.process)
        for host in hosts.values():
            if host.process is not None:
                _wait_listening(host)
        yield hosts


def _wait_listening(host: SshHost, timeout: float = 20.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert host.process is not None
        if host.process.poll() is not None:
            raise RuntimeError(f"sshd on {host.name} exited: "
                               f"{(host.home.parent / 'sshd.log').read_text()}")
        try:
            with socket.create_connection((host.address, 22), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"sshd on {host.name} ({host.address}) did not listen")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def client_home(root: Path, hosts: dict[str, SshHost], known: list[str], key: Path) -> Path:
    """A HOME for the CLI: ~/.ssh/config maps each name to its address with the test key;
    known_hosts lists the hosts in ``known``."""
    home = root / "client-home"
    ssh = home / ".ssh"
    ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
    blocks = [f"Host {h.name}\n  HostName {h.address}\n  User root\n" for h in hosts.values()]
    blocks.append(f"Host *\n  IdentityFile {key}\n")
    (ssh / "config").write_text("".join(blocks))
    (ssh / "known_hosts").write_text("".join(hosts[n].known_hosts_line() for n in known))
    shutil.rmtree(home / "shoal", ignore_errors=True)
    return home
