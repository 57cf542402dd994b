"""Command lines for each benchmarked tool, and whether that tool can run here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.sshd import DEBIAN_PSSH, SshEnv

BIN_DIR = Path(sys.executable).parent
PSSH_LIB_CLIENT = Path(__file__).with_name("pssh_lib_client.py")

# Tool names as they appear in results.
SHOAL = "shoal"
PSSH = "pssh"  # Debian's pssh package: /usr/bin/parallel-ssh
CLUSH = "clush"  # ClusterShell
PSSH_LIB = "parallel-ssh-lib"  # PyPI parallel-ssh: the pssh.clients library
SSH = "ssh"
LOCAL_PIPE = "local-pipe"


def find_executable(name: str) -> Path | None:
    """An executable next to the running interpreter (same venv) first, else on PATH."""
    local = BIN_DIR / name
    if local.exists():
        return local
    found = shutil.which(name)
    return Path(found) if found else None


def pssh_argv(ssh: SshEnv, n: int, command: str) -> list[str]:
    """Debian pssh over the first n aliases, n in parallel, our ssh_config passed through."""
    return [
        str(DEBIAN_PSSH),
        "-h",
        str(ssh.hostsfile(n)),
        "-p",
        str(n),
        "-t",
        "0",
        "-x",
        f"-F {ssh.config}",
        "-i",
        command,
    ]


def clush_argv(ssh: SshEnv, n: int, command: str) -> list[str]:
    """ClusterShell's clush on h[1-n] with fanout n, our ssh_config passed through `-o`."""
    clush = find_executable("clush")
    return [
        str(clush or "clush"),
        "-n",
        "-S",
        "-w",
        f"h[1-{n}]",
        "-f",
        str(n),
        "-o",
        f"-F {ssh.config}",
        command,
    ]


def pssh_lib_argv(ssh: SshEnv, n: int, command: str) -> list[str]:
    """A fresh Python process using the parallel-ssh library's ParallelSSHClient."""
    return [
        sys.executable,
        "-P",  # not bench/ first on sys.path: bench/copy.py would shadow the stdlib's copy
        str(PSSH_LIB_CLIENT),
        "-n",
        str(n),
        "--port",
        str(ssh.port),
        "--user",
        ssh.user,
        "--key",
        str(ssh.key),
        command,
    ]


def ssh_argv(ssh: SshEnv, command: str) -> list[str]:
    """Plain OpenSSH to the first alias."""
    return ["ssh", "-F", str(ssh.config), ssh.hosts[0], command]


def local_pipe_argv(command: str) -> list[str]:
    """The same command piped through cat on this machine: the ceiling for throughput."""
    return ["sh", "-c", f"{command} | cat > /dev/null"]


def shoal_all_argv(shoal: Path, command: str) -> list[str]:
    """Whole-fleet fan-out through shoal."""
    return [str(shoal), "run", "--all", "--", *command.split()]


def shoal_node_argv(shoal: Path, node: str, command: str) -> list[str]:
    """One node through shoal."""
    return [str(shoal), "run", "-n", node, "--", *command.split()]


def _missing_pssh() -> str | None:
    return None if DEBIAN_PSSH.exists() else f"{DEBIAN_PSSH} not installed"


def _missing_clush() -> str | None:
    return None if find_executable("clush") else "clush (ClusterShell) not installed"


def _missing_pssh_lib() -> str | None:
    if importlib.util.find_spec("pssh") is None:
        return "parallel-ssh library (pssh.clients) not importable by this Python"
    return None


# Fan-out peers in the order they run within a round, after shoal.
FANOUT_PEERS: dict[str, tuple[Callable[[SshEnv, int, str], list[str]], Callable[[], str | None]]]
FANOUT_PEERS = {
    PSSH: (pssh_argv, _missing_pssh),
    CLUSH: (clush_argv, _missing_clush),
    PSSH_LIB: (pssh_lib_argv, _missing_pssh_lib),
}


def _first_line(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (res.stdout or res.stderr).strip()
    return text.splitlines()[0] if text else "?"


def tool_versions(shoal: Path | None) -> dict[str, str]:
    """Version strings of every tool, for the report."""
    versions = {
        SSH: _first_line(["ssh", "-V"]),
        PSSH: f"Debian pssh {_first_line([str(DEBIAN_PSSH), '--version'])}",
        CLUSH: f"ClusterShell {_first_line([str(find_executable('clush')), '--version'])}",
    }
    try:
        versions[PSSH_LIB] = f"parallel-ssh {importlib.metadata.version('parallel-ssh')}"
    except importlib.metadata.PackageNotFoundError:
        versions[PSSH_LIB] = "not installed"
    if shoal is not None:
        versions[SHOAL] = _first_line([str(shoal), "--version"])
    return versions
