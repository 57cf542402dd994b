"""ssh targets from ``-H`` specs and the inventory file, and the remote command line (pure).

A ``-H`` spec is a comma-separated list of ``[user@]host[:port]`` items whose host part is a
node set (``user@web[1-20].example,db1:2222``). A name that the inventory knows takes the
inventory's settings (an explicit ``user@`` or ``:port`` still wins). The inventory is TOML::

    [defaults]                   # optional, for every host below
    user = "deploy"
    identity = "~/.ssh/id_ed25519"

    [hosts."web[1-3]"]           # a node set: the same settings for each
    address = "{node}.dc1.example"   # what to connect to ({node}: the name); default the name
    port = 22
    jump = "bastion"             # another inventory host, or [user@]host[:port]

    [hosts.bastion]
    address = "203.0.113.7"

Everything ssh itself knows (``~/.ssh/config``: HostName, User, Port, IdentityFile,
ProxyJump...) applies under these; what the inventory or ``-H`` says is passed explicitly.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..logic.nodeset import NodeSet, NodeSetError
from ..wire.messages import RunSpec

MAX_HOSTS = 100_000
_USER_RE = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEYS = {"address", "user", "port", "identity", "jump"}


@dataclass(frozen=True)
class SshTarget:
    """One host reached over ssh; ``name`` is how output and summaries name it."""

    name: str
    address: str
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    jump: str | None = None

    @property
    def where(self) -> str:
        """``[user@]address[:port]``, for messages."""
        text = f"{self.user}@{self.address}" if self.user else self.address
        return f"{text}:{self.port}" if self.port else text


def split_items(text: str) -> list[str]:
    """Commas outside brackets separate items: ``a[1,3].x,b`` is two."""
    items: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur).strip())
    return [i for i in items if i]


def _port(value: object, where: str) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ConfigError(f"{where}: port must be a number from 1 to 65535, not {value!r}")
    return value


def _user(value: object, where: str) -> str:
    if not isinstance(value, str) or not _USER_RE.fullmatch(value):
        raise ConfigError(f"{where}: bad user name {value!r}")
    return value


def _expand(pattern: str, where: str) -> list[str]:
    try:
        names = list(NodeSet.parse(pattern))
    except NodeSetError as e:
        raise ConfigError(f"{where}: {e}") from None
    if len(names) > MAX_HOSTS:
        raise ConfigError(f"{where}: {len(names)} hosts, more than {MAX_HOSTS}")
    return names


class Inventory:
    """Named ssh hosts (``load_inventory``); an empty one knows no names."""

    def __init__(self, hosts: Mapping[str, SshTarget] | None = None) -> None:
        self.hosts = dict(hosts or {})

    def names(self) -> NodeSet:
        return NodeSet(self.hosts)

    def target(self, name: str) -> SshTarget:
        return self.hosts.get(name) or SshTarget(name=name, address=name)


def parse_inventory(data: Mapping[str, Any], where: str = "inventory") -> Inventory:
    unknown = set(data) - {"defaults", "hosts"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}: use [defaults] "
                          "and [hosts.NAME]")
    defaults = data.get("defaults", {})
    hosts = data.get("hosts", {})
    if not isinstance(defaults, dict) or not isinstance(hosts, dict):
        raise ConfigError(f"{where}: [defaults] and [hosts.NAME] must be tables")
    out: dict[str, SshTarget] = {}
    for pattern, settings in hosts.items():
        here = f"{where}: hosts.{pattern}"
        if not isinstance(settings, dict):
            raise ConfigError(f"{here} must be a table (address, user, port, identity, jump)")
        merged = {**defaults, **settings}
        bad = set(merged) - _KEYS
        if bad:
            raise ConfigError(f"{here}: unknown key(s) {sorted(bad)}; known: {sorted(_KEYS)}")
        for key in ("address", "identity", "jump"):
            if key in merged and (not isinstance(merged[key], str) or not merged[key]):
                raise ConfigError(f"{here}: {key} must be a non-empty string")
        for name in _expand(pattern, here):
            if name in out:
                raise ConfigError(f"{here}: {name} is already defined by another entry")
            out[name] = SshTarget(
                name=name,
                address=str(merged.get("address", name)).replace("{node}", name),
                user=_user(merged["user"], here) if "user" in merged else None,
                port=_port(merged["port"], here) if "port" in merged else None,
                identity=merged.get("identity"),
                jump=merged.get("jump"))
    return Inventory(out)


def load_inventory(path: Path, required: bool = False) -> Inventory:
    """The inventory at ``path``; an empty one if it does not exist (unless ``required``)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"no inventory at {path}: write one (docs/cli.md, "
                              "\"ssh targets\") or name hosts with -H user@host") from None
        return Inventory()
    except OSError as e:
        raise ConfigError(f"cannot read the inventory {path}: {e.strerror}") from None
    try:
        return parse_inventory(tomllib.loads(text), str(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def parse_hosts(spec: str, inventory: Inventory) -> list[SshTarget]:
    """``-H`` text into targets, in order, each name once."""
    out: dict[str, SshTarget] = {}
    for item in split_items(spec):
        where = f"-H {item!r}"
        user: str | None = None
        port: int | None = None
        rest = item
        if "@" in rest:
            u, rest = rest.rsplit("@", 1)
            user = _user(u, where)
        if ":" in rest.rsplit("]", 1)[-1]:
            rest, p = rest.rsplit(":", 1)
            port = _port(p, where)
        for name in _expand(rest, where):
            t = inventory.target(name)
            t = replace(t, user=user or t.user, port=port or t.port)
            if name in out and out[name] != t:
                raise ConfigError(f"{where}: {name} is named twice with different settings")
            out[name] = t
    if len(out) > MAX_HOSTS:
        raise ConfigError(f"-H names {len(out)} hosts, more than {MAX_HOSTS}")
    return list(out.values())


def split_nodes(nodes: str, inventory: Inventory) -> tuple[str, list[SshTarget]]:
    """A ``-n`` node set's inventory hosts go over ssh; the rest stays for the controller.
    A set the CLI cannot read alone (``@group``) goes to the controller as it is."""
    if not nodes or not inventory.hosts:
        return nodes, []
    try:
        wanted = NodeSet.parse(nodes)
    except NodeSetError:
        return nodes, []
    ssh = wanted & inventory.names()
    agents = wanted - ssh
    return str(agents), [inventory.target(n) for n in ssh]


def exclude(targets: Iterable[SshTarget], text: str) -> list[SshTarget]:
    """``-x``: leave out the names it lists (a set with ``@group`` excludes no ssh host)."""
    if not text:
        return list(targets)
    try:
        out = NodeSet.parse(text)
    except NodeSetError:
        return list(targets)
    return [t for t in targets if t.name not in out]


def remote_command(spec: RunSpec) -> str:
    """The line the remote login shell runs: every word quoted for a POSIX shell, so the
    command gets exactly ``spec.argv``; ``spec.shell`` goes to ``/bin/sh -c`` as one word."""
    words = list(spec.argv) if spec.argv else ["/bin/sh", "-c", spec.shell or ""]
    if words[0].startswith("-"):  # bash's exec would read it as an option, dash's has no --
        raise ConfigError(f"command {words[0]!r}: over ssh a command cannot start with '-'")
    parts = []
    for name, value in spec.env.items():
        if not _ENV_NAME_RE.fullmatch(name):
            raise ConfigError(f"--env {name!r}: over ssh, names must be shell identifiers")
        parts.append(f"export {name}={shlex.quote(value)}")
    if spec.cwd:
        parts.append(f"cd -- {shlex.quote(spec.cwd)} || exit 1")
    parts.append("exec " + " ".join(shlex.quote(w) for w in words))
    return "; ".join(parts)
