"""Open ssh connections with the host key policy; asyncssh's and the OS's errors become
one ``Unreachable`` reason each, here and nowhere else."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import asyncssh

from .hostkeys import HostKeyPolicy, PolicyClient
from .targets import Inventory, SshTarget, parse_hosts


class HostUnreachable(Exception):
    """A host shoal could not reach or log in to (exit status 255)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def default_known_hosts() -> list[Path]:
    return [Path("~/.ssh/known_hosts").expanduser()]


# The same ciphers asyncssh offers by default, AES-GCM first: asyncssh builds ChaCha20-Poly1305
# from separate primitives, new cipher objects per packet, which costs more CPU per packet
# than one AES-GCM call (with AES-NI) for the same strength. OpenSSH servers accept both.
AES_GCM = (b"aes256-gcm@openssh.com", b"aes128-gcm@openssh.com")


def cipher_order(opts: asyncssh.SSHClientConnectionOptions) -> dict[str, list[str]]:
    """``encryption_algs`` for ``connect``: asyncssh's own list, AES-GCM first, unless
    ~/.ssh/config names the Ciphers (then nothing: the config's choice stands)."""
    if opts.config.get("Ciphers") is not None:
        return {}
    algs = list(opts.encryption_algs)
    ordered = [a for a in AES_GCM if a in algs] + [a for a in algs if a not in AES_GCM]
    return {"encryption_algs": [a.decode("ascii") for a in ordered]}


def identity_public_key(path: str) -> asyncssh.SSHKey | None:
    """The public half of an identity file (``path.pub``, else the key file's own public
    part), or None if neither reads: then the agent's keys are not narrowed."""
    for candidate in (path + ".pub", path):
        try:
            return asyncssh.read_public_key(candidate)
        except (OSError, asyncssh.KeyImportError):
            continue
    return None


class Connector:
    """Connections of one command: the same policy, one connection per jump host."""

    def __init__(self, inventory: Inventory, timeout: float, *,
                 known_hosts: Path | None = None, accept_new: bool = False) -> None:
        self.known_hosts = known_hosts
        self.accept_new = accept_new
        self.inventory = inventory
        self.timeout = timeout
        self._jumps: dict[str, asyncio.Task[asyncssh.SSHClientConnection]] = {}
        self._policies: dict[tuple[Path, ...], HostKeyPolicy] = {}

    def _policy_for(self, opts: asyncssh.SSHClientConnectionOptions) -> HostKeyPolicy:
        """``--known-hosts``, else the files ~/.ssh/config names for this host
        (UserKnownHostsFile), else ~/.ssh/known_hosts; one policy (one read) per list."""
        if self.known_hosts is not None:
            files = [self.known_hosts]
        else:
            named = opts.known_hosts if isinstance(opts.known_hosts, list) else []
            files = [Path(f).expanduser() for f in named
                     if isinstance(f, str)] or default_known_hosts()
        key = tuple(files)
        if key not in self._policies:
            self._policies[key] = HostKeyPolicy(files, self.accept_new)
        return self._policies[key]

    async def options(self, t: SshTarget,
                      tunnel: object = ()) -> asyncssh.SSHClientConnectionOptions:
        """``t``'s options: ~/.ssh/config read for this host (``config=()``: asyncssh's
        default file; without it the options would know no config), what the inventory or
        ``-H`` says on top. Built once per host: the connection reuses the parsed config."""
        # Public keys only, as docs/cli.md says: no prompts in a fan-out, and no GSSAPI
        # (asyncssh's default is on, OpenSSH's off): its key exchange authenticates the
        # server by Kerberos instead of the host key known_hosts lists.
        kwargs: dict[str, Any] = {"password_auth": False, "kbdint_auth": False,
                                  "gss_auth": False, "gss_kex": False,
                                  "host_based_auth": False}
        if t.user:
            kwargs["username"] = t.user
        if t.port:
            kwargs["port"] = t.port
        if t.identity:
            path = os.path.expanduser(t.identity)
            kwargs["client_keys"] = [path]
            # asyncssh tries every key an ssh agent holds before client_keys: with many,
            # the server's MaxAuthTries ends the login before the named key is offered.
            # The agent may still sign with that key (a passphrase-protected one).
            public = identity_public_key(path)
            if public is not None:
                kwargs["agent_identities"] = [public]
        opts: asyncssh.SSHClientConnectionOptions = \
            await asyncssh.SSHClientConnectionOptions.construct(
                config=(), host=t.address, tunnel=tunnel, **kwargs)
        return opts

    async def open(self, t: SshTarget) -> asyncssh.SSHClientConnection:
        """A logged-in connection to ``t``, or ``HostUnreachable`` saying why not."""
        client: PolicyClient | None = None
        try:
            tunnel = await self._jump(t.jump) if t.jump else ()
            opts = await self.options(t, tunnel)
            policy = self._policy_for(opts)

            def factory() -> PolicyClient:
                nonlocal client
                client = PolicyClient(policy)
                return client

            async with asyncio.timeout(self.timeout):
                # connect() resets what its own parameters name (port, tunnel) unless
                # they are given again: the options alone would lose the jump host.
                return await asyncssh.connect(
                    t.address, t.port or (), tunnel=tunnel, options=opts,
                    known_hosts=policy.known_hosts(), client_factory=factory,
                    connect_timeout=self.timeout, **cipher_order(opts))
        except HostUnreachable:
            raise
        except asyncssh.HostKeyNotVerifiable as e:
            raise HostUnreachable(client.refusal if client and client.refusal
                                  else f"host key not verifiable: {e.reason}") from None
        except asyncssh.PermissionDenied:
            user = t.user or "the default user"
            raise HostUnreachable(f"permission denied (publickey) for {user} on "
                                  f"{t.where}") from None
        except TimeoutError:
            raise HostUnreachable(f"no answer within {self.timeout:g}s") from None
        except ConnectionRefusedError:
            raise HostUnreachable(f"connection refused by {t.where}") from None
        except socket.gaierror as e:
            raise HostUnreachable(f"unknown host {t.address}: {e.strerror}") from None
        except asyncssh.KeyImportError as e:
            raise HostUnreachable(f"cannot read identity {t.identity}: {e}") from None
        except asyncssh.Error as e:
            raise HostUnreachable(f"ssh: {e.reason}") from None
        except OSError as e:
            if e.filename:  # an identity or config file
                raise HostUnreachable(f"cannot read {e.filename}: {e.strerror}") from None
            raise HostUnreachable(f"cannot connect to {t.where}: "
                                  f"{e.strerror or e}") from None
        except ValueError as e:  # asyncssh: bad options or config
            raise HostUnreachable(f"ssh: {e}") from None

    async def _jump(self, spec: str) -> asyncssh.SSHClientConnection:
        if spec not in self._jumps:
            jump = self.inventory.target(spec) if spec in self.inventory.hosts \
                else parse_hosts(spec, self.inventory)[0]
            self._jumps[spec] = asyncio.ensure_future(self.open(jump))
        try:
            return await asyncio.shield(self._jumps[spec])
        except HostUnreachable as e:
            raise HostUnreachable(f"jump host {spec}: {e.reason}") from None

    def close(self) -> None:
        for task in self._jumps.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            else:
                task.cancel()
