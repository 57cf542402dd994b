"""A private sshd on 127.0.0.1 for the ssh-based peers, plus the Debian packages it needs."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.proc import stop_process

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = "ssh-keygen"
DEBIAN_PSSH = Path("/usr/bin/parallel-ssh")

# Debian package -> a file that shows it is installed.
PACKAGES: dict[str, Path] = {
    "openssh-server": SSHD,
    "openssh-client": Path("/usr/bin/ssh"),
    "pssh": DEBIAN_PSSH,
    "pdsh": Path("/usr/bin/pdcp"),  # bench/copy.py's pdcp
}


def ensure_packages(log: bool = True) -> list[str]:
    """Install the missing Debian packages (one `apt-get update` first); return what was added."""
    missing = [pkg for pkg, marker in PACKAGES.items() if not marker.exists()]
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"missing packages {missing} and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    quiet = subprocess.DEVNULL if log else None
    if log:
        print(f"[bench] installing Debian packages: {' '.join(missing)}", flush=True)
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=quiet)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=quiet,
    )
    return missing


def free_port() -> int:
    """Ask the kernel for a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SshEnv:
    """Everything a client needs to reach the private sshd."""

    root: Path
    port: int
    user: str
    key: Path
    config: Path
    hosts: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def hostsfile(self, n: int) -> Path:
        """A file with the first n host aliases, one a line (written once per n)."""
        path = self.root / f"hosts-{n}"
        if not path.exists():
            path.write_text("".join(f"{h}\n" for h in self.hosts[:n]))
        return path


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _sshd_config(
    root: Path, port: int, user: str, host_key: Path, auth_keys: Path, home: Path | None
) -> str:
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {root / 'sshd.pid'}",
        f"AuthorizedKeysFile {auth_keys}",
        "UsePAM no",
        "PubkeyAuthentication yes",
        "AuthenticationMethods publickey",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        "StrictModes no",
        "MaxStartups 200:30:400",
        "MaxSessions 200",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "LogLevel ERROR",
        "Subsystem sftp internal-sftp",  # scp (pscp, clush --copy) and shoal copy -H use it
    ]
    if home is not None:
        # Sessions get an empty HOME, so the remote shell skips the bench host's own rc files
        # (e.g. a slow `pyenv init` in ~/.bashrc) that would otherwise dominate every session.
        lines.append(f"SetEnv HOME={home}")
    return "\n".join(lines) + "\n"


def _ssh_config(hosts: list[str], port: int, user: str, key: Path) -> str:
    blocks = []
    for host in hosts:
        blocks.append(f"Host {host}\n  HostName 127.0.0.1\n  Port {port}\n")
    common = [
        "Host *",
        f"  User {user}",
        f"  IdentityFile {key}",
        "  IdentitiesOnly yes",
        "  IdentityAgent none",
        "  BatchMode yes",
        "  StrictHostKeyChecking no",
        "  UserKnownHostsFile /dev/null",
        "  LogLevel ERROR",
        "  ControlMaster no",
        "  ControlPath none",
    ]
    return "".join(blocks) + "\n".join(common) + "\n"


def _wait_ready(env: SshEnv, timeout: float) -> None:
    """Wait until `ssh h1 true` succeeds through the new sshd."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if env.process is not None and env.process.poll() is not None:
            raise RuntimeError(f"sshd exited with {env.process.returncode}")
        res = subprocess.run(
            ["ssh", "-F", str(env.config), env.hosts[0], "true"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        if res.returncode == 0:
            return
        last = res.stderr.decode(errors="replace").strip()
        time.sleep(0.2)
    raise RuntimeError(f"private sshd not reachable: {last}")


@contextmanager
def private_sshd(
    root: Path, n_hosts: int, timeout: float = 20.0, clean_home: bool = True
) -> Iterator[SshEnv]:
    """Run a private sshd under `root` with host aliases h1..h{n_hosts}; stop it on exit.

    With `clean_home`, remote sessions run with HOME set to an empty directory under `root`.
    """
    root.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    host_key = root / "ssh_host_ed25519_key"
    user_key = root / "id_ed25519"
    auth_keys = root / "authorized_keys"
    _keygen(host_key, "shoal-bench-host")
    _keygen(user_key, "shoal-bench-user")
    shutil.copyfile(user_key.with_suffix(".pub"), auth_keys)
    auth_keys.chmod(0o600)
    if os.geteuid() == 0:  # privilege separation directory; sshd run by others skips privsep
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    port = free_port()
    hosts = [f"h{i}" for i in range(1, n_hosts + 1)]
    sshd_conf = root / "sshd_config"
    home: Path | None = None
    if clean_home:
        home = root / "home"
        home.mkdir(exist_ok=True)
    sshd_conf.write_text(_sshd_config(root, port, user, host_key, auth_keys, home))
    ssh_conf = root / "ssh_config"
    ssh_conf.write_text(_ssh_config(hosts, port, user, user_key))
    log = (root / "sshd.log").open("wb")

    env = SshEnv(root=root, port=port, user=user, key=user_key, config=ssh_conf, hosts=hosts)
    env.process = subprocess.Popen(
        [str(SSHD), "-D", "-e", "-f", str(sshd_conf)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_ready(env, timeout)
        yield env
    finally:
        stop_process(env.process)
        log.close()
