"""Scopes, grants and the checks of them (pure; no I/O). The scope an operation needs is in
the operation table (operations.py); the auth middleware (auth.py) and the NATS dispatcher
(nats_api.py) look it up and check it through ``access.py``; handlers never check scopes.

A token carries *grants*: a scope name, optionally restricted after a colon.

- ``run:env=dev`` (labels, ``k=v[,k=v]``): only nodes with every one of these labels;
- ``run:web-[1-4]`` (a node set): only these nodes;
- ``sessions:own`` (also ``logs:own``, ``terminals:own``): only sessions this user created.

``admin`` holds every scope. A restriction narrows what an operation may *reach*: the nodes
a run goes to, the node a session is placed on (or runs on), the session a signal, a log
read or an attach acts on. Grants of the same scope add up: an operation is allowed when
any one of them allows it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Forbidden, ValidationError
from ..logic.nodeset import NodeSet, NodeSetError

SCOPES: dict[str, str] = {
    "read": "list and show nodes, sessions, services and metrics",
    "logs": "read a session's output",
    "run": "run commands on nodes (shoal run)",
    "sessions": "create, signal, kill and remove sessions",
    "terminals": "attach to a session's terminal, open pool terminals",
    "services": "create, scale, drain and remove services",
    "nodes": "drain, undrain and forget nodes",
    "tokens": "list, create and revoke tokens (never with more than one's own grants)",
    "admin": "everything, including the audit trail",
}
PUBLIC = "public"  # no credential at all (health checks, static files)
ANY = "any"  # any valid credential (who am I, log out)
RESTRICTABLE = frozenset({"run", "sessions", "terminals", "logs", "nodes"})
OWN = "own"


class Target(enum.Enum):
    """What an operation reaches, for restricted grants."""

    NONE = "none"
    SESSION = "session"  # an existing session: by its id (path ``{id}``, body ``id``)
    NODE = "node"  # a node: by its name (path ``{name}``, body ``name``)
    SPEC = "spec"  # a new session: the body is a SessionSpec, checked before placing
    RUN = "run"  # a fan-out run: checked by run_ws.py once the targets are resolved
    GRANTS = "grants"  # a new token: its grants must be within the caller's


class _TableView(Mapping[Any, Any]):
    """One of the operation table's indexes (operations.py), read on first use: the table
    names the handlers, whose modules import this one."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _table(self) -> Mapping[Any, Any]:
        from . import operations

        return getattr(operations, self._name)  # type: ignore[no-any-return]

    def __getitem__(self, key: Any) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


# The operation table's rules by name, its HTTP routes, and what NATS serves (operations.py).
OPS: Mapping[str, Any] = _TableView("OPS")
HTTP: Mapping[tuple[str, str], str] = _TableView("HTTP")
NATS_OPS: Mapping[str, Any] = _TableView("NATS_OPS_MAP")


def http_op(method: str, template: str) -> str | None:
    """The operation of an HTTP route (its template as aiohttp gives it), or None."""
    from . import operations

    return operations.http_op(method, template)


def table_markdown() -> str:
    """The table of docs/security.md (a test checks the doc has it verbatim)."""
    from . import operations

    return operations.table_markdown()


# ---------------------------------------------------------------------- grants


@dataclass(frozen=True)
class Grant:
    scope: str
    labels: tuple[tuple[str, str], ...] = ()
    nodes: NodeSet | None = None
    own: bool = False

    @property
    def restricted(self) -> bool:
        return bool(self.labels) or self.nodes is not None or self.own

    def __str__(self) -> str:
        if self.own:
            return f"{self.scope}:{OWN}"
        if self.labels:
            return f"{self.scope}:" + ",".join(f"{k}={v}" for k, v in self.labels)
        if self.nodes is not None:
            return f"{self.scope}:{self.nodes}"
        return self.scope

    def reaches(self, labels: Mapping[str, str], name: str) -> bool:
        """Whether this grant reaches a node with this name and these labels."""
        if self.own or not self.restricted:
            return True
        if self.nodes is not None:
            return name in self.nodes
        return all(labels.get(k) == v for k, v in self.labels)

    def covers(self, other: Grant) -> bool:
        """Whether holding this grant means also holding ``other`` (for making tokens)."""
        if self.scope == "admin" and not self.restricted:
            return True
        if self.scope != other.scope:
            return False
        return not self.restricted or self == other


def parse_grant(text: str) -> Grant:
    scope, sep, rest = text.strip().partition(":")
    if scope not in SCOPES:
        raise ValidationError(f"unknown scope {scope!r}: use one of {', '.join(SCOPES)} "
                              "(optionally restricted: run:env=dev, run:web-[1-4], "
                              "sessions:own)")
    if not sep:
        return Grant(scope)
    if scope not in RESTRICTABLE:
        raise ValidationError(f"scope {scope!r} cannot be restricted; only "
                              f"{', '.join(sorted(RESTRICTABLE))} can")
    if not rest:
        raise ValidationError(f"{text!r}: give a restriction after the colon (env=dev, a "
                              "node set such as web-[1-4], or own)")
    if rest == OWN:
        if scope not in ("sessions", "logs", "terminals"):
            raise ValidationError(f"{scope}:own: only sessions, logs and terminals can be "
                                  "limited to one's own sessions")
        return Grant(scope, own=True)
    if "=" in rest:
        pairs = []
        for item in rest.split(","):
            k, eq, v = item.partition("=")
            if not eq or not k or not v:
                raise ValidationError(f"{text!r}: a label restriction is key=value[,key=value]")
            pairs.append((k, v))
        return Grant(scope, labels=tuple(sorted(pairs)))
    try:
        return Grant(scope, nodes=NodeSet.parse(rest))
    except NodeSetError as e:
        raise ValidationError(f"{text!r}: not a node set ({e})") from e


def parse_grants(texts: Iterable[str]) -> tuple[Grant, ...]:
    grants = tuple(parse_grant(t) for t in texts)
    if not grants:
        raise ValidationError("a token needs at least one scope (--scope read, ...)")
    return grants


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user, the token they used, and what it grants."""

    user: str
    token_id: str
    grants: tuple[Grant, ...]

    def holding(self, scope: str) -> list[Grant]:
        """The grants that give ``scope`` (admin gives every scope, unrestricted)."""
        if scope in (PUBLIC, ANY):
            return [Grant(scope)]
        return [g for g in self.grants if g.scope == scope or g.scope == "admin"]

    @property
    def scopes(self) -> list[str]:
        return [str(g) for g in self.grants]


def admin(user: str = "admin", token_id: str = "admin") -> Principal:
    return Principal(user, token_id, (Grant("admin"),))


def require(principal: Principal, op: str) -> list[Grant]:
    """The grants that allow ``op``; Forbidden naming the missing scope if none."""
    scope = OPS[op].scope
    held = principal.holding(scope)
    if not held:
        raise Forbidden(f"forbidden: {op} needs the {scope!r} scope, and the token "
                        f"{principal.token_id} of user {principal.user} has only "
                        f"{', '.join(principal.scopes) or 'none'}")
    return held


def check_nodes(principal: Principal, op: str, nodes: Mapping[str, Mapping[str, str]]) -> None:
    """Every node of ``nodes`` (name -> labels) within a grant of ``op``'s scope, else
    Forbidden naming the ones outside. A restricted run is refused, never narrowed: the
    person sees exactly where the command would not go."""
    held = require(principal, op)
    outside = [n for n, labels in nodes.items() if not any(g.reaches(labels, n) for g in held)]
    if outside:
        raise Forbidden(f"forbidden: {op} would reach {NodeSet(outside)}, outside what the "
                        f"token {principal.token_id} of user {principal.user} may reach "
                        f"({', '.join(str(g) for g in held)}); narrow the targets")


def check_placement(principal: Principal, op: str, node: str | None,
                    selector: Mapping[str, str],
                    nodes: Mapping[str, Mapping[str, str]]) -> None:
    """A new session may only be placed where a grant reaches: on a named node within it,
    or with a selector that implies a grant's labels (so every candidate is within)."""
    held = require(principal, op)
    for g in held:
        if not g.restricted or g.own:
            return
        if node is not None and g.reaches(nodes.get(node, {}), node):
            return
        if node is None and g.labels and all(selector.get(k) == v for k, v in g.labels):
            return
    where = f"node {node}" if node else "any node (no node= and no selector that implies it)"
    raise Forbidden(f"forbidden: {op} would place the session on {where}, outside what the "
                    f"token {principal.token_id} of user {principal.user} may reach "
                    f"({', '.join(str(g) for g in held)}); name a node within it or add its "
                    "labels to the selector")


def check_session(principal: Principal, op: str, owner: str, node: str | None,
                  selector: Mapping[str, str],
                  nodes: Mapping[str, Mapping[str, str]]) -> None:
    """An existing session: its owner for ``own`` grants, its node (or, not placed yet,
    where it may be placed) for node restrictions."""
    held = require(principal, op)
    for g in held:
        if g.own and owner and owner == principal.user:
            return
        if g.own:
            continue
        if not g.restricted:
            return
        if node and g.reaches(nodes.get(node, {}), node):
            return
        if not node and g.labels and all(selector.get(k) == v for k, v in g.labels):
            return
    raise Forbidden(f"forbidden: {op} on a session {'of ' + owner if owner else ''}"
                    f"{' on node ' + node if node else ''} is outside what the token "
                    f"{principal.token_id} of user {principal.user} may reach "
                    f"({', '.join(str(g) for g in held)})")


def check_grants(principal: Principal, wanted: Iterable[Grant]) -> None:
    """A token may only hand out what it holds."""
    beyond = [str(w) for w in wanted if not any(g.covers(w) for g in principal.grants)]
    if beyond:
        raise Forbidden(f"forbidden: the token {principal.token_id} of user {principal.user} "
                        f"cannot grant {', '.join(beyond)}: a token only hands out scopes it "
                        "holds itself")
