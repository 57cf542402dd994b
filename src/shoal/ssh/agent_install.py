"""``shoal agent install``/``uninstall``: this machine's agent onto ssh hosts, and off again.

Per host, over one ssh connection (the host key policy of ``run``: never skipped): probe what
is there (``agent_remote``), send only the files whose sha256 differs, remake the venv only
when a wheel changed, restart the agent only when something changed, then wait until the
controller lists the node ``ready`` with the new agent's pid. A second run finds every hash
equal and the agent running: it changes nothing. docs/operations.md, "Installing agents over
ssh", has the layout and the unit's hardening.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import msgspec

from .. import config as c
from ..errors import ConfigError, ShoalError
from . import agent_remote
from .connect import Connector, HostUnreachable
from .targets import SshTarget
from .wheelhouse import Wheel

if TYPE_CHECKING:
    import asyncssh

    from ..client.aio import Client

DEFAULT_PREFIX = "/opt/shoal"
UNIT_PATH = f"/etc/systemd/system/{agent_remote.UNIT_NAME}"
_SOURCE = Path(agent_remote.__file__).read_text()
# [nats] settings that name files: their name under PREFIX/etc on the host, and mode.
NATS_FILES = {"creds": ("nats.creds", 0o600), "ca": ("nats-ca.pem", 0o644),
              "cert": ("nats-cert.pem", 0o644), "key": ("nats-key.pem", 0o600)}


class InstallError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class InstallOptions:
    nats: c.NatsConfig
    # Contents of the files [nats] names (creds, ca, cert, key), copied to PREFIX/etc.
    files: dict[str, bytes] = field(default_factory=dict)
    prefix: str = DEFAULT_PREFIX
    labels: dict[str, str] = field(default_factory=dict)
    name_from: Literal["host", "inventory"] = "host"
    systemd: bool = True
    python: str = "python3"
    wait: float = 60.0


def check_prefix(prefix: str) -> str:
    p = os.path.normpath(prefix)
    if not os.path.isabs(p) or p in ("/", "/usr", "/etc", "/var", "/opt", "/home", "/root"):
        raise ConfigError(f"--prefix {prefix!r}: give an absolute directory of its own, such "
                          f"as {DEFAULT_PREFIX} (uninstall deletes it whole)")
    return p


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def local_options(nats_url: str | None, **kw: Any) -> InstallOptions:
    """The agent credentials of ``$SHOAL_HOME/agent.toml`` with the URL the targets use."""
    path = c.shoal_home() / "agent.toml"
    if not path.exists():
        raise ConfigError(f"no agent credentials at {path}: run `shoal up` once, or write "
                          "agent.toml with the [nats] user and password agents use")
    local = c.load(c.AgentConfig, path, {})
    if not (local.nats.password or local.nats.creds):
        # Node identities (shoal up's default): no shared secret to copy, and each target
        # must enroll for a credential of its own.
        raise ConfigError(f"{path} has no shared NATS credential to install: this fleet uses "
                          "node identities. On each host run shoal agent --name NAME --join "
                          "URL --token T (shoal token create --join makes T; docs/operations.md"
                          ", 'Node identities'), or install from a fleet with the shared agent "
                          "user (shoal up --shared-agent-user)")
    url = nats_url or local.nats.url
    for server in url.split(","):
        parts = urlsplit(server.strip() if "://" in server else f"nats://{server.strip()}")
        if _is_loopback(parts.hostname or ""):
            raise ConfigError(f"the NATS URL {url} names this machine's loopback, which the "
                              "targets cannot reach: pass --nats nats://ADDRESS:PORT with an "
                              "address they can")
    try:
        files = {k: Path(getattr(local.nats, k)).read_bytes() for k in NATS_FILES
                 if getattr(local.nats, k, None)}
    except OSError as e:
        raise ConfigError(f"cannot read {e.filename} (named in {path}): {e.strerror}") from None
    nats = msgspec.structs.replace(local.nats, url=url)
    return InstallOptions(nats=nats, files=files, **kw)


class Remote:
    """One target's ``agent_remote`` operations over one connection."""

    def __init__(self, conn: asyncssh.SSHClientConnection, python: str) -> None:
        self.conn = conn
        self.python = python

    async def call(self, op: str, *args: str, data: bytes | None = None) -> dict[str, Any]:
        words = " ".join(shlex.quote(a) for a in (op, *args))
        done = await self.conn.run(f"{shlex.quote(self.python)} -c {shlex.quote(_SOURCE)} "
                                   f"{words}", input=data if data is not None else b"",
                                   encoding=None, check=False)
        out = done.stdout if isinstance(done.stdout, bytes) else b""
        err = done.stderr if isinstance(done.stderr, bytes) else b""
        if done.exit_status != 0:
            text = err.decode(errors="replace").strip().splitlines()
            if done.exit_status == 127:
                raise InstallError(f"no {self.python} on the host: install Python "
                                   f"{sys.version_info[0]}.{sys.version_info[1]} there "
                                   "(with its venv module), or name one with --python")
            raise InstallError(f"{op} failed: {text[-1] if text else f'status {done.exit_status}'}")
        result: dict[str, Any] = msgspec.json.decode(out)
        return result


@dataclass
class Outcome:
    target: SshTarget
    ok: bool
    message: str


def agent_toml(opts: InstallOptions, name: str, address: str) -> bytes:
    etc = f"{opts.prefix}/etc"
    nats = msgspec.structs.replace(opts.nats, **{
        k: f"{etc}/{NATS_FILES[k][0]}" if k in opts.files else None for k in NATS_FILES})
    cfg = c.AgentConfig(nats=nats, name=name, labels=dict(sorted(opts.labels.items())),
                        address=address, state_dir=f"{opts.prefix}/state")
    return c.to_toml(msgspec.to_builtins(cfg)).encode()


def unit_text(prefix: str) -> bytes:
    """The systemd unit; docs/operations.md says why each line is there (and why no more)."""
    return f"""[Unit]
Description=shoal agent
Documentation=https://github.com/shoal/shoal/blob/main/docs/operations.md
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
Environment=SHOAL_HOME={prefix}/etc PYTHONUNBUFFERED=1
ExecStart={prefix}/venv/bin/shoal agent --config {prefix}/etc/agent.toml
Restart=on-failure
RestartSec=2
KillMode=mixed
TimeoutStopSec=30
Delegate=yes
TasksMax=infinity
LimitNOFILE=1048576
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
RestrictRealtime=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
""".encode()


def _digest(src: bytes | Wheel) -> str:
    return src.sha256 if isinstance(src, Wheel) else hashlib.sha256(src).hexdigest()


class Installer:
    def __init__(self, opts: InstallOptions, connector: Connector, client: Client,
                 wheels: list[Wheel] | None = None) -> None:
        self.opts = opts
        self.connector = connector
        self.client = client
        self.wheels = wheels or []
        self.unit = UNIT_PATH if opts.systemd else ""
        self.version = metadata.version("shoal")

    async def install(self, t: SshTarget) -> Outcome:
        try:
            return Outcome(t, True, await self._install(t))
        except HostUnreachable as e:
            return Outcome(t, False, e.reason)
        except (InstallError, ShoalError) as e:
            return Outcome(t, False, e.reason if isinstance(e, InstallError) else e.message)

    async def uninstall(self, t: SshTarget) -> Outcome:
        try:
            return Outcome(t, True, await self._uninstall(t))
        except HostUnreachable as e:
            return Outcome(t, False, e.reason)
        except (InstallError, ShoalError) as e:
            return Outcome(t, False, e.reason if isinstance(e, InstallError) else e.message)

    def _check(self, found: dict[str, Any]) -> None:
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if found["python"] != here or found["machine"] != platform.machine():
            raise InstallError(
                f"the host has Python {found['python']} on {found['machine']}; this "
                f"machine's wheels are for Python {here} on {platform.machine()}: install "
                f"python{here} there and pass --python python{here}")
        if self.opts.systemd and not found["systemd"]:
            raise InstallError("systemd does not run there: pass --no-systemd to start the "
                               "agent detached (docs/operations.md)")

    def _name(self, t: SshTarget, found: dict[str, Any]) -> str:
        from ..wire.messages import NodeName

        name = t.name if self.opts.name_from == "inventory" else \
            str(found["hostname"]).split(".")[0]
        try:
            msgspec.convert(name, NodeName)
        except msgspec.ValidationError:
            raise InstallError(f"{name!r} is not a node name (letters, digits, '_', '-'): "
                               "pass --name-from inventory") from None
        return name

    def _wanted(self, name: str, address: str) -> dict[str, tuple[bytes | Wheel, int]]:
        """Path (under PREFIX, or absolute) -> content and mode."""
        p = self.opts.prefix
        files: dict[str, tuple[bytes | Wheel, int]] = {
            f"wheels/{w.name}": (w, 0o644) for w in self.wheels}
        files["etc/agent.toml"] = (agent_toml(self.opts, name, address), 0o600)
        for k, data in self.opts.files.items():
            name, mode = NATS_FILES[k]
            files[f"etc/{name}"] = (data, mode)
        if self.unit:
            files[self.unit] = (unit_text(p), 0o644)
        return files

    async def _install(self, t: SshTarget) -> str:
        conn = await self.connector.open(t)
        try:
            remote = Remote(conn, self.opts.python)
            p = self.opts.prefix
            found = await remote.call("probe", p, self.unit)
            self._check(found)
            name = self._name(t, found)
            peer = conn.get_extra_info("peername")
            address = str(peer[0]) if peer and not t.jump else t.address
            wanted = self._wanted(name, address)
            have: dict[str, str] = found["files"]
            changed = [k for k, (src, _) in wanted.items() if have.get(k) != _digest(src)]
            stale = [k for k in have if k not in wanted]
            # A stopped agent gets its venv made anew too: that is how install repairs one.
            new_venv = found["version"] != self.version or not found["pid"] or any(
                k.startswith("wheels/") for k in [*changed, *stale])
            if not changed and not stale and not new_venv and found["pid"]:
                await self._wait_ready(remote, name, found["pid"])
                return f"unchanged (agent {self.version} running, pid {found['pid']})"
            for key, (src, mode) in wanted.items():
                if key in changed:
                    path = key if key.startswith("/") else f"{p}/{key}"
                    data = src.path.read_bytes() if isinstance(src, Wheel) else src
                    await remote.call("put", path, f"{mode:o}", data=data)
            gone = [f"{p}/{k}" for k in stale if not k.startswith(("wheels/", "/"))]
            if gone:
                await remote.call("delete", p, *gone)
            if new_venv:
                await remote.call("stop", p, self.unit)
                await remote.call("venv", p, self.version, *(w.name for w in self.wheels))
            started = await remote.call("start", p, self.unit)
            await self._wait_ready(remote, name, int(started["pid"]))
            what = "installed" if not found["files"] else "updated"
            return f"{what}: node {name} ready (agent {self.version}, pid {started['pid']})"
        finally:
            conn.close()

    async def _wait_ready(self, remote: Remote, name: str, pid: int) -> None:
        deadline = time.monotonic() + self.opts.wait
        seen = "not listed"
        while time.monotonic() < deadline:
            try:
                node = await self.client.node(name)
                seen = node.state
                if node.state == "ready" and (not pid or node.pid == pid):
                    return
                if node.pid != pid:
                    seen = f"{node.state} (pid {node.pid}, not the new agent's {pid})"
            except ShoalError:
                seen = "not listed"
            await asyncio.sleep(0.3)
        tail = (await remote.call("log", self.opts.prefix, self.unit)).get("log", "")
        raise InstallError(f"node {name} not ready within {self.opts.wait:g}s ({seen}); the "
                           f"agent's log ends:\n{tail}")

    async def _uninstall(self, t: SshTarget) -> str:
        conn = await self.connector.open(t)
        try:
            remote = Remote(conn, self.opts.python)
            found = await remote.call("probe", self.opts.prefix, self.unit)
            result = await remote.call("remove", self.opts.prefix, self.unit)
        finally:
            conn.close()
        if result["left"]:
            raise InstallError(f"{self.opts.prefix} is still there after removing it")
        name = found["name"]
        if not result["removed"]:
            return f"nothing installed under {self.opts.prefix}"
        if name:
            await self._forget(name)
        return f"removed {self.opts.prefix}" + (f", node {name} forgotten" if name else "")

    async def _forget(self, name: str) -> None:
        """The node stops beating; once the controller calls it down, drop its record."""
        deadline = time.monotonic() + self.opts.wait
        while time.monotonic() < deadline:
            try:
                node = await self.client.node(name)
            except ShoalError:
                return  # not listed (any more)
            if node.state == "down":
                try:
                    await self.client.forget(name)
                except ShoalError:
                    pass
                continue
            await asyncio.sleep(0.3)
        raise InstallError(f"agent removed, but node {name} still looks up after "
                           f"{self.opts.wait:g}s; forget it later with `shoal nodes forget "
                           f"{name}`")


async def run_all(targets: list[SshTarget], work: Callable[[SshTarget], Any],
                  fanout: int, report: Callable[[Outcome], None]) -> list[Outcome]:
    gate = asyncio.Semaphore(fanout)

    async def one(t: SshTarget) -> Outcome:
        async with gate:
            outcome: Outcome = await work(t)
        report(outcome)
        return outcome

    return list(await asyncio.gather(*(one(t) for t in targets)))
