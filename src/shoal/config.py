"""Configuration: TOML files under ``$SHOAL_HOME``, environment overrides, flag overrides.

Precedence, lowest first: built-in defaults, the TOML file, ``SHOAL_*`` environment
variables, command-line flags. ``SHOAL_NATS_URL`` sets ``[nats] url``; ``SHOAL_CAPACITY`` sets
the top-level ``capacity``; and so on (docs/configuration.md has the full list).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from msgspec import Struct

from .errors import ConfigError

DEFAULT_HTTP_PORT = 7470


class NatsConfig(Struct, forbid_unknown_fields=True):
    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    creds: str | None = None  # a NATS .creds file (JWT deployments)
    ca: str | None = None  # CA bundle for TLS to NATS


class AgentConfig(Struct, forbid_unknown_fields=True):
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    name: str = ""
    labels: dict[str, str] = {}
    capacity: int = 16
    address: str = ""  # the host clients should use to reach this node's ports
    grace: float = 5.0  # seconds between SIGTERM and SIGKILL
    heartbeat: float = 2.0
    state_dir: str = ""
    ports: str = "20000-29999"  # range for sessions that ask for ports


class ControllerConfig(Struct, forbid_unknown_fields=True):
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    host: str = "127.0.0.1"
    port: int = DEFAULT_HTTP_PORT
    token: str = ""
    node_ttl: float = 6.0  # a node with no heartbeat for this long is down
    origins: list[str] = []  # extra WebSocket origins to accept
    retention: float = 86400.0  # seconds a finished session's record and output are kept
    public_terminals: bool = False  # /terminal open to anyone (rate-limited), not only to you
    terminal_parking_url: str = ""  # where to send visitors when full, instead of a queue
    terminal_command: list[str] = msgspec.field(default_factory=lambda: ["/bin/bash", "-l"])
    terminal_detach_timeout: float = 30.0
    terminal_idle_timeout: float = 1800.0
    terminal_lifetime: float = 14400.0
    terminal_rate: int = 6  # new terminals per minute per client address
    replicas: int = 1  # servers of a NATS cluster that keep each bucket and the output stream
    trusted_proxies: list[str] = []  # addresses whose X-Forwarded-For/-Proto we believe
    groups: str = ""  # node groups: a ClusterShell groups.conf, groups.d dir, YAML or flat file


class ClientConfig(Struct, forbid_unknown_fields=True):
    url: str = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
    token: str = ""


C = TypeVar("C", bound=Struct)


def shoal_home() -> Path:
    """Where state lives: ``$SHOAL_HOME``, else the per-user state directory."""
    env = os.environ.get("SHOAL_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "shoal"


def new_secret() -> str:
    import secrets  # imported here: every command loads this module, few make secrets

    return secrets.token_urlsafe(32)


def write_secret_file(path: Path, text: str) -> None:
    """Write a file readable by its owner only, created so from the start (no window)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer for our flat config shapes (scalars, lists, one level of tables)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, str):
            return msgspec.json.encode(v).decode()
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{scalar(k)} = {scalar(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    # Nested structs (only ``nats``) become tables; other maps (labels) are written inline.
    lines = [f"{k} = {scalar(v)}" for k, v in data.items() if v is not None and k not in _TABLES]
    for k in _TABLES:
        if isinstance(data.get(k), dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {scalar(vv)}" for kk, vv in data[k].items() if vv is not None]
    return "\n".join(lines) + "\n"


_TABLES = ("nats",)


def to_builtins(cfg: Struct) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(cfg)
    return out


def save(path: Path, cfg: Struct) -> None:
    write_secret_file(path, to_toml(msgspec.to_builtins(cfg)))


def _env_overrides(kind: type[Struct]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in msgspec.structs.fields(kind):
        if field.type is NatsConfig:
            nats = {
                f.name: os.environ[f"SHOAL_NATS_{f.name.upper()}"]
                for f in msgspec.structs.fields(NatsConfig)
                if f"SHOAL_NATS_{f.name.upper()}" in os.environ
            }
            if nats:
                out["nats"] = nats
            continue
        env = os.environ.get(f"SHOAL_{field.name.upper()}")
        if env is not None:
            out[field.name] = _parse_env(field.name, env)
    return out


def _parse_env(name: str, value: str) -> Any:
    if name == "labels":
        return parse_labels(value.split(",") if value else [])
    if name in ("public_terminals",):
        return value.lower() in ("1", "true", "yes", "on")
    if name in ("origins", "terminal_command", "trusted_proxies"):
        return [v for v in value.split(",") if v]
    return value


def parse_labels(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label {item!r} is not key=value; write it like -l zone=east")
        labels[key.strip()] = value.strip()
    return labels


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k == "nats":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load(kind: type[C], path: Path | None, flags: dict[str, Any] | None = None) -> C:
    """Build a config of ``kind`` from the file (if it exists), the environment and flags."""
    data: dict[str, Any] = {}
    if path is not None and path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
    data = _merge(data, _env_overrides(kind))
    data = _merge(data, flags or {})
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as e:
        where = f" in {path}" if path is not None and path.exists() else ""
        raise ConfigError(f"invalid configuration{where}: {e}") from e


def default_node_name() -> str:
    import socket

    return socket.gethostname().split(".")[0] or "node"
