"""The nodes and sessions operations (docs/api.md; declared in operations.py). Handlers are
thin: they get their request struct, call the session service, and return a typed result;
the log stream and the attach socket are in streams.py. Errors go through replies.py."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import MultiMapping

from ..errors import ConflictError, NotFoundError, ValidationError
from ..logic.nodeset import natural_key
from ..natsio import outputlog
from ..wire import api as w
from ..wire import messages as m
from . import nodelist, replies
from .context import Call
from .streams import session_nodes

if TYPE_CHECKING:
    from .server import Controller

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_http_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own errors (unknown path, wrong method, body too large) as JSON under /api."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if not request.path.startswith("/api/") or e.status < 400:
            raise
        hint = {404: "no such API path; see /api/v1/openapi.json",
                405: f"method {request.method} is not allowed on {request.path}",
                413: "the body is too large (max 1 MiB)"}.get(e.status, e.reason)
        return replies.error_json(e.status, hint)


def ok(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=m.to_json(data), status=status, content_type="application/json")


def _ctl(request: web.Request) -> Controller:
    return request.app["controller"]  # type: ignore[no-any-return]


def parse_signal(value: str | int) -> int:
    if isinstance(value, int) or (value.isascii() and value.isdigit()):
        num = int(value)
        if 1 <= num <= 64:
            return num
        raise ValidationError(f"signal {value} is out of range 1-64")
    name = value.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError as e:
        raise ValidationError(f"unknown signal {value!r}; use a name like TERM or a number") from e


# ---------------------------------------------------------------------- nodes
# Handlers of ``call`` operations: (Call, request struct) -> result, for both transports.


MAX_PAGE = 100_000


async def list_nodes(c: Call, q: w.NodesQuery) -> w.NodesPage:
    """In natural name order; ``nodes``, ``state`` and ``q`` filter, ``after`` and
    ``limit`` page; ``total`` is how many match the filters in all."""
    registry = c.ctl.registry
    wanted = nodelist.parse_nodeset(q.nodes) if q.nodes else None
    match = nodelist.matcher(q.state, q.q[:256], wanted)
    limit = min(q.limit or MAX_PAGE, MAX_PAGE)
    names, keys = registry.ordered()
    if wanted is not None and len(wanted) < len(names):  # a small set: look those up only
        candidates = [n for n in wanted if n in registry]
        start = nodelist.start_after(candidates, [natural_key(n) for n in candidates],
                                     q.after)
    else:
        candidates = names
        start = nodelist.start_after(names, keys, q.after)
    page: list[m.NodeInfo] = []
    if wanted is None and not q.state and not q.q:
        total = len(candidates)
        for name in candidates[start:start + limit]:
            info = registry.node(name)
            if info is not None:
                page.append(info)
    else:
        total = 0
        for i, name in enumerate(candidates):
            info = registry.node(name)
            if info is None or not match(info):
                continue
            total += 1
            if i >= start and len(page) < limit:
                page.append(info)
    return w.NodesPage(nodes=page, total=total)


async def fleet_summary(c: Call, _: w.Empty) -> m.FleetSummary:
    return nodelist.summarise(c.ctl.registry.snapshot().values())


def _node(c: Call, name: str) -> m.NodeInfo:
    node = c.ctl.registry.node(name)
    if node is None:
        raise NotFoundError(f"no node named {name!r}; `shoal nodes` lists them")
    return node


async def show_node(c: Call, r: w.Named) -> m.NodeInfo:
    return _node(c, r.name)


async def drain_node(c: Call, r: w.DrainNode) -> w.DrainResult:
    remaining = await c.ctl.sessions.drain(r.name, r.deadline, r.wait)
    return w.DrainResult(node=r.name, remaining=remaining)


async def forget_node(c: Call, r: w.Named) -> None:
    node = _node(c, r.name)
    if node.state != "down":
        raise ConflictError(f"node {r.name} is {node.state}: stop its agent first, then "
                            "forget it")
    await c.ctl.registry.forget(r.name)


async def undrain_node(c: Call, r: w.Named) -> w.UndrainResult:
    await c.ctl.sessions.set_draining(r.name, False)
    return w.UndrainResult(node=r.name)


# ---------------------------------------------------------------------- sessions


async def create_session(c: Call, spec: m.SessionSpec) -> w.SessionCreated:
    record, created = await c.ctl.sessions.create(spec, owner=c.user)
    return w.SessionCreated(session=record, created=created)


def session_filters(query: MultiMapping[str]) -> dict[str, Any]:
    """``sessions.list``'s query string: ``label=k=v`` repeated is the body's ``labels``."""
    labels = {}
    for item in query.getall("label", []):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValidationError(f"label filter {item!r} is not key=value")
        labels[k] = v
    found: dict[str, Any] = {k: query[k] for k in ("node", "name") if k in query}
    return {**found, "state": query.get("state") or None, "labels": labels}


async def list_sessions(c: Call, q: w.ListSessions) -> list[m.SessionRecord]:
    return c.ctl.sessions.find(q.state, q.node, q.name, q.labels)


async def show_session(c: Call, r: w.SessionRef) -> m.SessionRecord:
    return await c.ctl.sessions.get(r.id)


async def signal_session(c: Call, r: w.SignalSession) -> m.SessionRecord:
    return await c.ctl.sessions.signal(r.id, parse_signal(r.signal))


async def kill_session(c: Call, r: w.SessionRef) -> m.SessionRecord:
    return await c.ctl.sessions.kill(r.id)


async def remove_session(c: Call, r: w.SessionRef) -> w.Removed:
    await c.ctl.sessions.remove(r.id)
    return w.Removed()


async def read_logs(c: Call, r: w.ReadLogs) -> list[w.StoredLog]:
    """What is stored from ``offset``, up to the chunk that reaches ``max_bytes`` (the
    NATS API pages; HTTP streams, below)."""
    await c.ctl.sessions.get(r.id)
    chunks: list[w.StoredLog] = []
    size = 0
    async for item in outputlog.read(c.ctl.js, r.id, r.offset,
                                     nodes=session_nodes(c.ctl, r.id)):
        if isinstance(item, outputlog.Truncated):
            chunks.append(w.LogTruncated(start=item.start, end=item.end))
            continue
        chunks.append(w.LogChunk(stream=item.stream, offset=item.offset, data=item.data))
        size += len(item.data)
        if size >= r.max_bytes:
            break
    return chunks
