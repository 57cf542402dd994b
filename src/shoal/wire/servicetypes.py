"""Services as typed structs: what a client asks for, what the services bucket keeps, and
what ``service show`` answers. Shared by the controller, the client and the CLI."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from msgspec import Meta, Struct

from ..errors import ValidationError
from . import messages as m

SERVICES_BUCKET = "shoal-services"  # service records, one key per service name

# A DNS label: it appears in URLs (/s/NAME/) and in session specs (``service``).
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
ServiceName = Annotated[str, Meta(min_length=1, max_length=63, pattern=NAME_PATTERN)]
Check = Annotated[str, Meta(min_length=3, max_length=1024)]
_NAME = re.compile(NAME_PATTERN)


class ServiceSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """A named set of replicas: each a session running ``command`` (or ``shell``) with a
    port of its own in ``$PORT``; or, with ``runtime = "container"``, a container of
    ``image`` whose first ``container_ports`` entry is published on the replica's port."""

    name: ServiceName
    command: m.Argv | None = None
    shell: Annotated[str, Meta(min_length=1, max_length=262144)] | None = None
    replicas: Annotated[int, Meta(ge=0, le=1000)] = 1
    check: Check = "tcp"  # "tcp" or "http:/path"
    interval: Annotated[float, Meta(ge=0.05, le=3600)] = 2.0
    timeout: Annotated[float, Meta(ge=0.01, le=600)] = 1.0
    rise: Annotated[int, Meta(ge=1, le=100)] = 2
    fall: Annotated[int, Meta(ge=1, le=100)] = 3
    proxy: bool = False
    drain_deadline: Annotated[float, Meta(ge=0, le=86400)] = 30.0
    env: m.EnvMap = {}
    cwd: Annotated[str, Meta(min_length=1, max_length=4096)] | None = None
    user: Annotated[str, Meta(min_length=1, max_length=32)] = "agent"
    selector: m.Labels = {}
    labels: m.Labels = {}
    limits: m.Limits = m.Limits()
    # Container replicas (docs/containers.md), passed through to each replica's spec.
    runtime: m.Runtime = "process"
    image: m.ImageRef | None = None
    container_ports: Annotated[list[m.ContainerPort], Meta(max_length=64)] = []
    mounts: Annotated[list[m.Mount], Meta(max_length=64)] = []
    network: m.NetworkName = "none"

    def validate(self) -> None:
        validate(self)


class ServiceRecord(Struct, frozen=True):
    """A service as stored in the services bucket. ``draining`` maps replica session ids
    to the wall-clock time by which they end; ``stopped`` is a drained service (no
    replicas until it is scaled again)."""

    name: str
    spec: ServiceSpec
    created: float = 0.0
    draining: dict[str, float] = {}
    stopped: bool = False


class ReplicaView(Struct, frozen=True):
    id: str
    node: str
    host: str
    port: int
    state: str
    health: str
    draining: bool
    ewma_ms: float | None
    inflight: int
    chosen: int
    last_error: str = ""


class ServiceView(Struct, frozen=True):
    name: str
    spec: ServiceSpec
    created: float
    stopped: bool
    replicas: list[ReplicaView]
    up: int
    url: str = ""


class Best(Struct, frozen=True):
    host: str
    port: int
    url: str
    replica: str = ""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValidationError(
            f"bad service name {name[:80]!r}: use lowercase letters, digits and '-' "
            "(a DNS label: at most 63, starting and ending with a letter or digit)")
    return name


def parse_check(check: str) -> tuple[Literal["tcp", "http"], str]:
    """``tcp`` or ``http:/path`` -> (kind, path)."""
    if check == "tcp":
        return "tcp", ""
    kind, sep, path = check.partition(":")
    if kind == "http" and sep and path.startswith("/") and not any(
            c.isspace() or ord(c) < 32 or ord(c) == 127 for c in path):
        return "http", path
    raise ValidationError(f"bad check {check[:80]!r}: use 'tcp' or 'http:/path' "
                          "(a path starting with /, no spaces)")


def replica_spec(spec: ServiceSpec, sid: str) -> m.SessionSpec:
    """The session spec of one replica: a daemon restarted always, on its own port(s); a
    container's allocated ports are its ``container_ports``, the first one served."""
    ports = len(spec.container_ports) if spec.runtime == "container" else 1
    return m.SessionSpec(
        id=sid, name=f"{spec.name}-replica", command=spec.command, shell=spec.shell,
        env=spec.env, cwd=spec.cwd, user=spec.user, restart="always", ports=ports,
        selector=spec.selector, strategy="spread", service=spec.name,
        labels={**spec.labels, "shoal.service": spec.name}, limits=spec.limits,
        runtime=spec.runtime, image=spec.image, container_ports=spec.container_ports,
        mounts=spec.mounts, network=spec.network)


def validate(spec: ServiceSpec) -> None:
    """What a service needs beyond its replicas' session specs (the controller checks
    those too, as for any session)."""
    if spec.runtime == "container":
        if not spec.container_ports:
            raise ValidationError("a container service needs container_ports: the port its "
                                  "image listens on (the first one is checked and served)")
    elif (spec.command is None) == (spec.shell is None):
        raise ValidationError("give exactly one of command (an argv list) or shell (a string)")
    m.check_process("command", spec.command, spec.shell, spec.env, spec.cwd)
    parse_check(spec.check)
    if spec.timeout > spec.interval * 10:
        raise ValidationError(f"check timeout {spec.timeout:g}s is too long for an interval "
                              f"of {spec.interval:g}s (at most 10 intervals)")
    if spec.user not in ("agent", "ephemeral") and not re.fullmatch(m.UNIX_USER_PATTERN, spec.user):
        raise ValidationError(f"user {spec.user!r}: use 'agent', 'ephemeral' or the name of "
                              "a user the node's agent allows (its run_as setting)")
