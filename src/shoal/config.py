"""Configuration: TOML files under ``$SHOAL_HOME``, environment overrides, flag overrides.

Precedence, lowest first: built-in defaults, the TOML file, ``SHOAL_*`` environment
variables, command-line flags. ``SHOAL_NATS_URL`` sets ``[nats] url``; ``SHOAL_CAPACITY`` sets
the top-level ``capacity``; and so on (docs/configuration.md has the full list).
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Struct

from .errors import ConfigError
from .logic.agentsettings import check_run_as, parse_networks, parse_uid_range

DEFAULT_HTTP_PORT = 7470
SERVICES_PORT_NEXT = -1  # services_port default: the controller's port + 1 (any if that is 0)


class NatsConfig(Struct, forbid_unknown_fields=True):
    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = None
    creds: str | None = None  # a NATS .creds file (JWT deployments)
    ca: str | None = None  # CA bundle for TLS to NATS
    # Mutual TLS: this process's client certificate and its key (PEM files).
    cert: str | None = None
    key: str | None = None
    tls_hostname: str | None = None  # the name to verify the server by, if not the URL's host
    # Try the servers of ``url`` in random order (spreads clients over a cluster); false: in
    # the order given (``shoal up`` spreads its own processes so).
    randomize: bool = True


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
    # Network policy for throwaway users (agent/netpolicy.py, docs/security.md).
    ephemeral_network: Literal["none", "outbound", "open"] = "none"
    ephemeral_deny: list[str] = []  # networks refused even with "outbound"
    ephemeral_uids: str = "1900000000-1999999999"  # the UIDs throwaway users get
    # Container sessions (docs/containers.md): podman's binary ("" turns them off); its OCI
    # runtime; an image store of its own ("" = podman's default); the host directories
    # read-only mounts may come from (none by default).
    podman: str = "podman"
    podman_runtime: str = "runc"
    podman_root: str = ""
    podman_runroot: str = ""
    container_mounts: list[str] = []
    # The address container ports are published on: loopback by default; the node's own
    # address where controllers on other machines must reach container replicas.
    container_publish: str = "127.0.0.1"
    run_as: list[str] = []  # users a run or session may ask to run as (agent/runas.py)
    # Enrollment (agent/identity.py): the controller's URL, a join token, the CA to verify an
    # https:// controller by. Used once, when this node has no credential of its own yet.
    join_url: str = ""
    join_token: str = ""
    join_ca: str = ""

    def __post_init__(self) -> None:
        check_run_as(self.run_as)
        try:
            ipaddress.ip_address(self.container_publish)
        except ValueError:
            raise ValueError(f"container_publish: {self.container_publish!r} is not an IP "
                             "address (give this node's address, or 127.0.0.1)") from None

        try:
            parse_uid_range(self.ephemeral_uids)
        except ValueError as e:
            raise ValueError(f"ephemeral_uids: {e}") from None
        try:
            parse_networks(self.ephemeral_deny)
        except ValueError as e:
            raise ValueError(f"ephemeral_deny: {e}") from None


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
    # Public terminals in containers of this image (docs/terminals.md) instead of throwaway
    # users; terminal_command then runs inside it. "" = throwaway users.
    terminal_image: str = ""
    terminal_detach_timeout: float = 30.0
    terminal_idle_timeout: float = 1800.0
    terminal_lifetime: float = 14400.0
    terminal_rate: int = 6  # new terminals per minute per client (an IPv4 address or IPv6 /64)
    terminal_tickets: int = 4  # places in the waiting line one client may hold at once
    # Pool terminals' output has a stream of its own (it never evicts other sessions' logs).
    terminal_output_bytes: int = 1 << 30  # that stream's size, all terminals together
    terminal_output_cap: int = 16 << 20  # newest bytes kept per terminal
    # Servers of a NATS cluster that keep each bucket and stream; 0: 3, or the cluster's size
    # when smaller (1 on a lone server).
    replicas: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
    trusted_proxies: list[str] = []  # addresses whose X-Forwarded-For/-Proto we believe
    # Login through a trusted reverse proxy (controller/proxyauth.py): the header in which a
    # proxy of trusted_proxies names the authenticated user ("": off; e.g. "X-Remote-User"),
    # the grants such a user gets, and per-user grants instead of those.
    proxy_user_header: str = ""
    proxy_user_scopes: list[str] = msgspec.field(default_factory=lambda: ["read"])
    proxy_users: dict[str, list[str]] = {}
    public_url: str = ""  # the URL people reach this controller at (its host is allowed)
    allowed_hosts: list[str] = []  # further Host names it answers for ("*": any; see docs)
    login_lifetime: float = 7 * 86400.0  # seconds a browser login lasts
    audit_retention: float = 365 * 86400.0  # seconds the audit trail keeps an entry
    # Service traffic (/s/NAME/) has a listener of its own: never the controller's origin.
    services_port: int = SERVICES_PORT_NEXT  # 0: any free port
    services_url: str = ""  # its public base URL if not http://HOST:services_port
    groups: str = ""  # node groups: a ClusterShell groups.conf, groups.d dir, YAML or flat file
    # HTTPS on both listeners (API and services): the certificate (chain) and key, PEM files.
    tls_cert: str = ""
    tls_key: str = ""
    # Node identities (docs/security.md): the fleet's NATS signing keys (a file shoal up
    # makes, its default), and how long a node's credential lasts (0: a day).
    identity: str = ""
    node_credential_lifetime: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class ClientConfig(Struct, forbid_unknown_fields=True):
    url: str = f"http://127.0.0.1:{DEFAULT_HTTP_PORT}"
    token: str = ""
    reconnect_for: float = 60.0  # seconds `logs -f` and `attach` try to get a lost controller back
    ca: str = ""  # the CA to verify an https:// controller against (else the system's)


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


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` 0700 if it is missing; refuse one that another user owns or that
    others may write to (they could read or swap the secrets shoal keeps there)."""
    try:
        path.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        pass
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"cannot use {path} for shoal's files: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory: point SHOAL_HOME at a directory")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}):"
                          " shoal keeps secrets there, so it must be yours; choose another "
                          "SHOAL_HOME or chown the directory")
    if st.st_mode & 0o022:
        raise ConfigError(f"{path} can be written by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}): shoal keeps secrets there; "
                          f"run chmod go-w {path} (chmod 700 is best)")
    return path


def ensure_home() -> Path:
    return ensure_private_dir(shoal_home())


def write_secret_file(path: Path, text: str) -> None:
    """Write a file readable by its owner only: created 0600 under a fresh name (O_EXCL and
    O_NOFOLLOW, so a planted file or symlink is never written through), then renamed."""
    import secrets

    ensure_private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    if name in ("origins", "terminal_command", "trusted_proxies", "ephemeral_deny", "run_as",
                "allowed_hosts", "container_mounts"):
        return [v for v in value.split(",") if v]
    if name == "proxy_user_scopes":  # a grant has commas of its own (run:env=dev,zone=a)
        return value.split()
    if name == "proxy_users":  # "alice=admin;bob=read logs"
        users = (u.partition("=") for u in value.split(";") if u.strip())
        return {user.strip(): grants.split() for user, _, grants in users}
    return value


def parse_labels(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"label {item!r} is not key=value; write it like -l zone=east")
        labels[key.strip()] = value.strip()
    return labels


def parse_env(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``-e NAME=VALUE`` options; a bare ``NAME`` is an error, never silently dropped."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env {item!r} is not NAME=VALUE")
        env[name] = value
    return env


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
