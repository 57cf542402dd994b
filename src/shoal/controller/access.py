"""The scope check against the fleet's current state, for the HTTP middleware and the NATS
dispatcher alike: ``authorize`` looks the operation up in the operation table (operations.py),
finds what it would reach (the node, the session, the placement of a new session) and
raises Forbidden unless a grant of the caller reaches it. Also the audit entry of a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import Forbidden
from ..wire import messages as m
from . import scopes
from .audit import Entry, now
from .scopes import Principal, Target

if TYPE_CHECKING:
    from .server import Controller


class Reach(msgspec.Struct):
    """What a request names, as the middleware or dispatcher found it."""

    session: str | None = None
    node: str | None = None
    spec: m.SessionSpec | None = None
    scopes: list[str] | None = None  # of a token to create


def _labels(ctl: Controller) -> dict[str, Mapping[str, str]]:
    return {n: info.labels for n, info in ctl.registry.snapshot().items()}


async def authorize(ctl: Controller, principal: Principal, op: str, reach: Reach) -> list[str]:
    """Raise Forbidden unless ``principal`` may do ``op`` on what ``reach`` names; return
    the targets for the audit trail."""
    rule = scopes.OPS[op]
    held = scopes.require(principal, op)
    if rule.target is Target.NODE and reach.node:
        if any(g.restricted for g in held):
            info = ctl.registry.node(reach.node)
            scopes.check_nodes(principal, op, {reach.node: info.labels if info else {}})
        return [reach.node]
    restricted = any(g.restricted for g in held)
    if rule.target is Target.SESSION and reach.session:
        if not restricted and not rule.audit:
            return [reach.session]  # nothing to check, nothing to record: no lookup
        found = await ctl.sessions.store.get(reach.session)
        if found is None:
            return [reach.session]  # the handler answers 404
        record = found[0]
        if any(g.restricted for g in held):
            owner = record.owner if ctl.sessions.sealed(record) else ""
            scopes.check_session(principal, op, owner, record.node or None,
                                 record.spec.selector, _labels(ctl))
        return [record.id] + ([record.node] if record.node else [])
    if rule.target is Target.SPEC and reach.spec is not None:
        spec = reach.spec
        if any(g.restricted for g in held):
            scopes.check_placement(principal, op, spec.node, spec.selector, _labels(ctl))
        return [x for x in (spec.id, spec.node) if x]
    if rule.target is Target.GRANTS and reach.scopes is not None:
        scopes.check_grants(principal, scopes.parse_grants(reach.scopes))
    if rule.target in (Target.NODE, Target.SESSION, Target.SPEC) and \
            any(g.restricted for g in held):  # fail closed: what it reaches is unknown
        raise Forbidden(f"forbidden: {op} names no {rule.target.value} this controller "
                        f"could read, and the token {principal.token_id} is restricted")
    return []


def created(answer: Any, targets: list[str]) -> list[str]:
    """The audit targets of a session create, with the id and node it got."""
    record = answer.get("session", answer) if isinstance(answer, dict) else None
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        return [record["id"]] + ([record["node"]] if record.get("node") else [])
    return targets


def check_run(ctl: Controller, principal: Principal, nodes: list[str]) -> None:
    """The nodes a run resolved to, all within the caller's ``run`` grants."""
    labels = _labels(ctl)
    scopes.check_nodes(principal, "run", {n: labels.get(n, {}) for n in nodes})


def reach_of_body(op: str, data: Any) -> Reach:
    """What a NATS request (decoded JSON) or an HTTP body names, by the op's target kind."""
    target = scopes.OPS[op].target
    if not isinstance(data, dict):
        return Reach()
    if target is Target.SESSION and isinstance(data.get("id"), str):
        return Reach(session=data["id"])
    if target is Target.NODE and isinstance(data.get("name"), str):
        return Reach(node=data["name"])
    if target is Target.GRANTS and isinstance(data.get("scopes"), list):
        return Reach(scopes=[str(s) for s in data["scopes"]])
    if target is Target.SPEC:
        try:
            return Reach(spec=msgspec.convert(data, m.SessionSpec))
        except msgspec.ValidationError:
            return Reach()  # the operation itself refuses it, creating nothing
    return Reach()


def entry(principal: Principal | None, source: str, op: str, targets: list[str],
          status: int, result: str, reach: Reach | None = None,
          argv: list[str] | None = None, digest: str = "") -> Entry:
    if reach is not None and reach.spec is not None and not digest:
        digest = m.spec_digest(reach.spec)
        argv = argv or reach.spec.command or ([reach.spec.shell] if reach.spec.shell else None)
    return Entry(time=now(), user=principal.user if principal else "-",
                 token=principal.token_id if principal else "-", source=source, op=op,
                 targets=targets, argv=argv, digest=digest, result=result, status=status)
