"""The nodes and sessions operations (docs/api.md; declared in operations.py). Handlers are
thin: they get their request struct, call the session service, and return a typed result;
the log stream and the attach socket are HTTP's own. Errors go through replies.py."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from aiohttp import web
from multidict import MultiMapping

from ..errors import ConflictError, NotFoundError, ValidationError
from ..logic.nodeset import natural_key
from ..logic.sessionstate import FINAL
from ..natsio import outputlog
from ..natsio.bus import NATS_ERRORS
from ..wire import api as w
from ..wire import messages as m
from ..wire import subjects
from . import nodelist, replies
from .auth import origin_ok
from .context import Call

if TYPE_CHECKING:
    from .server import Controller

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_OFFSET = w.MAX_OFFSET
LOG_LINE_BYTES = 192 << 10


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


def _query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("1", "0", "true", "false", "yes", "no", ""):
        raise ValidationError(f"query parameter {name} must be true or false")
    return value in ("1", "true", "yes", "")


async def _start_offset(request: web.Request, sid: str, start: int, tail: int | None) -> int:
    """``?from=N``, or ``?tail=N`` bytes before the end of what is stored."""
    if tail is None:
        return start
    return max(0, await outputlog.end_offset(_ctl(request).js, sid) - tail)


def _start_params(request: web.Request) -> tuple[int, int | None]:
    start = _query_int(request, "from", 0)
    tail = _query_int(request, "tail", 0) if "tail" in request.query else None
    return start, tail


def _query_int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise ValidationError(f"query parameter {name} must be an integer, not {raw!r}") from e
    if not 0 <= value <= MAX_OFFSET:
        raise ValidationError(f"query parameter {name} must be between 0 and {MAX_OFFSET}")
    return value


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
    async for item in outputlog.read(c.ctl.js, r.id, r.offset):
        if isinstance(item, outputlog.Truncated):
            chunks.append(w.LogTruncated(start=item.start, end=item.end))
            continue
        chunks.append(w.LogChunk(stream=item.stream, offset=item.offset, data=item.data))
        size += len(item.data)
        if size >= r.max_bytes:
            break
    return chunks


async def session_logs(request: web.Request) -> web.StreamResponse:
    """NDJSON: ``{"t":"out","stream":..,"offset":..,"data":base64}`` lines, a
    ``{"t":"truncated","from":a,"to":b}`` line for bytes dropped by the cap, and a final
    ``{"t":"end",...}`` (the session ended) or ``{"t":"eof","offset":n}`` (no follow)."""
    ctl = _ctl(request)
    sid = request.match_info["id"]
    try:
        start, tail = _start_params(request)
        follow = _query_flag(request, "follow") if "follow" in request.query else False
        attempts = _query_flag(request, "attempts") if "attempts" in request.query else False
        await ctl.sessions.get(sid)  # 404 before the answer starts
        start = await _start_offset(request, sid, start, tail)
    except Exception as e:
        return replies.error_response(e)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson",
                                       "Cache-Control": "no-store"})
    await resp.prepare(request)

    progress = _Progress(start)
    try:
        last = await _stream_logs(ctl, resp, sid, progress, follow, attempts)
    except ConnectionResetError:  # the client went away: nobody to tell
        return resp
    except Exception as e:  # the answer has started: end it with the error, never replace it
        log.warning("logs of %s ended early at byte %d: %r", sid, progress.offset, e)
        last = w.LogError(offset=progress.offset,
                          message=f"reading the output failed: {replies.failure(e).message}")
    try:
        await resp.write(_line(last))
        await resp.write_eof()
    except ConnectionResetError:
        pass
    return resp


class _Progress:
    """How far an answer got: the offset after the last byte sent to the client."""

    def __init__(self, offset: int) -> None:
        self.offset = offset


def session_over(ctl: Controller, sid: str) -> Callable[[], Awaitable[bool]]:
    """For ``outputlog.read``: has the session ended (or been removed)?"""
    async def is_over() -> bool:
        found = await ctl.sessions.store.get(sid)
        return found is None or found[0].state in FINAL
    return is_over


async def _stream_logs(ctl: Controller, resp: web.StreamResponse, sid: str,
                       progress: _Progress, follow: bool, attempts: bool = False,
                       ) -> w.LogLine:
    """Write the NDJSON output lines, keeping ``progress`` at the last byte written;
    returns the closing line to send. With ``attempts``, a line
    ``{"t":"attempt","attempt":n,"offset":o}`` marks where each placement's output begins."""
    async for item in outputlog.read(ctl.js, sid, progress.offset, follow=follow,
                                     is_over=session_over(ctl, sid), attempts=attempts):
        if isinstance(item, outputlog.Chunk) and item.stream == outputlog.ATTEMPT:
            await resp.write(_line(w.LogAttempt(attempt=item.epoch, offset=item.offset)))
            continue
        if isinstance(item, outputlog.Truncated):
            await resp.write(_line(w.LogTruncated(start=item.start, end=item.end)))
            progress.offset = item.end
            continue
        # Lines stay short enough for line-oriented readers (base64 grows data by a third).
        for at in range(0, len(item.data), LOG_LINE_BYTES):
            piece = item.data[at:at + LOG_LINE_BYTES]
            await resp.write(_line(w.LogChunk(stream=item.stream, offset=item.offset + at,
                                              data=piece)))
            progress.offset = item.offset + at + len(piece)
    position = progress.offset
    found = await ctl.sessions.store.get(sid)
    if found is None:  # removed while we read
        return w.LogEnd(offset=position, state="removed", reason="removed")
    record = found[0]
    if record.state in FINAL and (follow or position >= record.output_bytes):
        return w.LogEnd(offset=position, state=record.state, exit_code=record.exit_code,
                        signal=record.signal, reason=record.reason)
    return w.LogEof(offset=position)


def _line(line: w.LogLine) -> bytes:
    return msgspec.json.encode(line) + b"\n"


# ---------------------------------------------------------------------- attach


ATTACHED_EVERY = 2.0


async def attach_session(request: web.Request) -> web.StreamResponse:
    """WebSocket: output replayed from ``?from=`` then live; input, resize from the client.

    Text frames are JSON control messages (hello, truncated, exit, error; resize from the
    client), binary frames are output (server -> client) or input (client -> server)."""
    ctl = _ctl(request)
    if not origin_ok(request, ctl.cfg.origins):
        return replies.error_json(403, "WebSocket origin not allowed")
    sid = request.match_info["id"]
    allowed = request.get("session_scope")
    if allowed is not None and allowed != sid:
        return replies.error_json(403, "this terminal link is for another session")
    try:
        start, tail = _start_params(request)
        record = await ctl.sessions.get(sid)
        start = await _start_offset(request, sid, start, tail)
    except Exception as e:
        return replies.error_response(e)
    if not ctl.sessions.sealed(record):  # written by someone holding an agent credential
        return replies.error_json(409, f"session {sid} was not made by a controller (its "
                                       "record has no valid seal): not attaching")
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1 << 20)
    await ws.prepare(request)
    await ws.send_str(_frame(w.AttachHello(session=sid, offset=start, state=record.state)))
    control = subjects.session_control(sid)
    attached = m.pack(m.SessionAttached())

    async def publish(payload: bytes) -> None:
        try:
            await ctl.nc.publish(control, payload)
        except NATS_ERRORS as e:  # NATS away: this keystroke (or beat) is lost, not the socket
            log.info("attach to %s: input not sent: %r", sid, e)

    async def keep_attached() -> None:
        while True:
            await publish(attached)
            await asyncio.sleep(ATTACHED_EVERY)

    progress = _Progress(start)

    async def pump_output() -> None:
        try:
            async for item in outputlog.read(ctl.js, sid, start, follow=True,
                                             is_over=session_over(ctl, sid)):
                if isinstance(item, outputlog.Truncated):
                    await ws.send_str(_frame(w.AttachTruncated(start=item.start, end=item.end)))
                    progress.offset = item.end
                else:
                    await ws.send_bytes(item.data)
                    progress.offset = item.offset + len(item.data)
            final = await ctl.sessions.get(sid)
            frame: w.AttachServerText = w.AttachExit(
                state=final.state, code=final.exit_code, signal=final.signal,
                reason=final.reason)
        except ConnectionResetError:  # the client went away
            return
        except Exception as e:  # one boundary: the client hears why, and where to resume
            log.warning("attach to %s ended early at byte %d: %r", sid, progress.offset, e)
            frame = w.AttachError(
                status=503, offset=progress.offset,
                message=f"reading the output failed: {replies.failure(e).message}")
        if not ws.closed:
            await ws.send_str(_frame(frame))

    async def pump_input() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await publish(m.pack(m.SessionInput(data=msg.data)))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    frame = _client_text.decode(msg.data)
                except msgspec.DecodeError:  # an unknown or malformed frame: ignored
                    continue
                if isinstance(frame, w.AttachResize) and frame.cols and frame.rows:
                    await publish(m.pack(m.Resize(
                        cols=max(1, min(frame.cols, 10000)), rows=max(1, min(frame.rows, 10000)))))
                elif isinstance(frame, w.AttachEof):
                    await publish(m.pack(m.SessionInput(data=b"", eof=True)))

    tasks = [asyncio.create_task(t()) for t in (keep_attached, pump_output, pump_input)]
    try:
        await asyncio.wait(tasks[1:], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close()
    return ws


_client_text = msgspec.json.Decoder(w.AttachClientText)


def _frame(frame: w.AttachServerText) -> str:
    return msgspec.json.encode(frame).decode()
