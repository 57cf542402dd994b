"""Host key policy: a key is trusted only if known_hosts lists it for that host.

asyncssh checks the server's key against the known_hosts files it is given and asks the
client (``validate_host_public_key``) about any other key; this is that answer. A host with
known keys that offers another one is refused as "host key changed"; a host with none is
"unknown host key", refused unless the user asked for ``--accept-new-host-keys`` (OpenSSH's
``StrictHostKeyChecking=accept-new``), which records the key in the first known_hosts file.
Either way the message names the key's fingerprint and what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

import asyncssh

DEFAULT_PORT = 22


def host_pattern(host: str, port: int) -> str:
    """How known_hosts names a host: ``host``, or ``[host]:port`` off port 22."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


class HostKeyPolicy:
    """Shared by every connection of one command (the files are read once)."""

    def __init__(self, files: list[Path], accept_new: bool = False) -> None:
        self.files = files
        self.accept_new = accept_new
        self._known: asyncssh.SSHKnownHosts | None = None

    def readable(self) -> list[str]:
        return [str(f) for f in self.files if f.is_file() and os.access(f, os.R_OK)]

    def known_hosts(self) -> asyncssh.SSHKnownHosts:
        """The files, parsed once for every connection (asyncssh would read them again for
        each host it is given them by name)."""
        if self._known is None:
            self._known = asyncssh.read_known_hosts(self.readable()) if self.readable() \
                else asyncssh.SSHKnownHosts()
        return self._known

    def decide(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> str:
        """Called for a key that known_hosts does not list for this host: "" to accept it
        (recorded), or why it is refused."""
        fingerprint = f"{key.get_algorithm()} {key.get_fingerprint()}"
        name = host_pattern(host, port)
        known = self.known_hosts().match(host, addr, port if port != DEFAULT_PORT else None)
        if key in known[0]:
            return ""  # recorded by this command since asyncssh read the file
        if known[0]:
            return (f"host key changed: {name} now offers {fingerprint}, which "
                    f"{self.files[0]} does not list for it; if the change is expected, "
                    f"remove the old key (ssh-keygen -R '{name}') and connect again")
        if not self.accept_new:
            return (f"unknown host key: {name} offers {fingerprint}; check it, then run "
                    f"again with --accept-new-host-keys to record it in {self.files[0]}")
        self.record(name, key)
        return ""

    def record(self, name: str, key: asyncssh.SSHKey) -> None:
        path = self.files[0]
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        line = " ".join(key.export_public_key("openssh").decode().split()[:2])
        with open(path, "a") as f:
            f.write(f"{name} {line}\n")
        self._known = None


class PolicyClient(asyncssh.SSHClient):
    """One connection's client: keeps the policy's refusal so the error can name it."""

    def __init__(self, policy: HostKeyPolicy) -> None:
        self.policy = policy
        self.refusal = ""

    def validate_host_public_key(self, host: str, addr: str, port: int,
                                 key: asyncssh.SSHKey) -> bool:
        self.refusal = self.policy.decide(host, addr, port, key)
        return not self.refusal
