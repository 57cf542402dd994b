"""HTTP API under ``/api/v1``: nodes and sessions (docs/api.md, and the OpenAPI document
served at ``/api/v1/openapi.json``). Handlers are thin: they decode, call the session
service, and encode; every error is JSON with a message a person can act on."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import msgspec
from aiohttp import web

from ..errors import ShoalError, Unavailable, ValidationError
from ..logic.nodeset import natural_key
from ..logic.sessionstate import FINAL
from ..natsio import outputlog
from ..natsio.bus import NATS_ERRORS
from ..wire import messages as m
from ..wire import subjects
from . import nodelist
from .auth import error_json, origin_ok

if TYPE_CHECKING:
    from .server import Controller

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY = 1 << 20
MAX_OFFSET = 1 << 50  # far beyond any session's output, and within every JSON integer
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
        return error_json(e.status, hint)


RETRY_AFTER = 2  # seconds a client waits before asking again while NATS is away


def unavailable(e: Unavailable) -> web.Response:
    resp = error_json(503, e.message)
    resp.headers["Retry-After"] = str(max(1, round(e.retry_after)))
    return resp


def nats_failure(e: BaseException) -> web.Response:
    """The answer when NATS fails under a request: a reason and when to retry, never an
    empty 504 (what aiohttp makes of an unhandled TimeoutError)."""
    what = str(e) or type(e).__name__
    if isinstance(e, TimeoutError):
        resp = error_json(504, f"NATS did not answer in time ({what}): the message bus is slow"
                               f" or restarting; retry in {RETRY_AFTER} s")
        resp.headers["Retry-After"] = str(RETRY_AFTER)
        return resp
    return unavailable(Unavailable(f"NATS is not reachable ({what}); retry in {RETRY_AFTER} s",
                                   RETRY_AFTER))


def api_errors(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Unavailable as e:
            return unavailable(e)
        except ShoalError as e:
            return error_json(e.status, e.message)
        except NATS_ERRORS as e:
            log.warning("%s %s: NATS failed: %r", request.method, request.path, e)
            return nats_failure(e)
        except msgspec.ValidationError as e:
            return error_json(422, f"invalid request: {e}")
        except msgspec.DecodeError as e:
            return error_json(400, f"the body is not valid JSON: {e}")

    return wrapped


async def body(request: web.Request, kind: type[T]) -> T:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ValidationError(f"body too large (max {MAX_BODY} bytes)")
    raw = await request.read()
    if not raw:
        raw = b"{}"
    return msgspec.json.decode(raw, type=kind)


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


class SignalBody(msgspec.Struct, forbid_unknown_fields=True):
    signal: str | int = "TERM"


class DrainBody(msgspec.Struct, forbid_unknown_fields=True):
    deadline: float | None = msgspec.field(default=None)
    wait: bool = False


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


MAX_PAGE = 100_000


@api_errors
async def list_nodes(request: web.Request) -> web.Response:
    """In natural name order; ``nodes``, ``state`` and ``q`` filter, ``after`` and
    ``limit`` page. ``X-Total-Count`` says how many match the filters in all."""
    registry = _ctl(request).registry
    q = request.query
    names_text = q.get("nodes", "")
    if len(names_text) > 65536:
        raise ValidationError("query parameter nodes is too long (max 65536 characters)")
    wanted = nodelist.parse_nodeset(names_text) if names_text else None
    match = nodelist.matcher(q.get("state", ""), q.get("q", "")[:256], wanted)
    limit = min(_query_int(request, "limit", MAX_PAGE) or MAX_PAGE, MAX_PAGE)
    names, keys = registry.ordered()
    if wanted is not None and len(wanted) < len(names):  # a small set: look those up only
        candidates = [n for n in wanted if n in registry]
        start = nodelist.start_after(candidates, [natural_key(n) for n in candidates],
                                     q.get("after", ""))
    else:
        candidates = names
        start = nodelist.start_after(names, keys, q.get("after", ""))
    page: list[m.NodeInfo] = []
    if wanted is None and not q.get("state") and not q.get("q"):
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
    resp = ok(page)
    resp.headers["X-Total-Count"] = str(total)
    return resp


@api_errors
async def fleet_summary(request: web.Request) -> web.Response:
    registry = _ctl(request).registry
    return ok(nodelist.summarise(registry.snapshot().values()))


@api_errors
async def show_node(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    node = _ctl(request).registry.node(name)
    if node is None:
        return error_json(404, f"no node named {name!r}; `shoal nodes` lists them")
    return ok(node)


@api_errors
async def drain_node(request: web.Request) -> web.Response:
    spec = await body(request, DrainBody)
    if spec.deadline is not None and not 0 <= spec.deadline <= 86400:
        raise ValidationError("deadline must be between 0 and 86400 seconds")
    name = request.match_info["name"]
    remaining = await _ctl(request).sessions.drain(name, spec.deadline, spec.wait)
    return ok({"node": name, "draining": True, "remaining": remaining})


@api_errors
async def forget_node(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    ctl = _ctl(request)
    node = ctl.registry.node(name)
    if node is None:
        return error_json(404, f"no node named {name!r}; `shoal nodes` lists them")
    if node.state != "down":
        return error_json(409, f"node {name} is {node.state}: stop its agent first, then "
                               "forget it")
    await ctl.registry.forget(name)
    return web.Response(status=204)


@api_errors
async def undrain_node(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _ctl(request).sessions.set_draining(name, False)
    return ok({"node": name, "draining": False})


# ---------------------------------------------------------------------- sessions


@api_errors
async def create_session(request: web.Request) -> web.Response:
    spec = await body(request, m.SessionSpec)
    principal = request.get("principal")
    record, created = await _ctl(request).sessions.create(
        spec, owner=principal.user if principal is not None else "")
    return ok(record, 201 if created else 200)


@api_errors
async def list_sessions(request: web.Request) -> web.Response:
    q = request.query
    states = {"live", *m.SessionState.__args__}  # type: ignore[attr-defined]
    if q.get("state") and q["state"] not in states:
        raise ValidationError(f"state must be one of {', '.join(sorted(states))}")
    labels = {}
    for item in q.getall("label", []):
        k, sep, v = item.partition("=")
        if not sep:
            raise ValidationError(f"label filter {item!r} is not key=value")
        labels[k] = v
    return ok(_ctl(request).sessions.find(q.get("state"), q.get("node"), q.get("name"), labels))


@api_errors
async def show_session(request: web.Request) -> web.Response:
    return ok(await _ctl(request).sessions.get(request.match_info["id"]))


@api_errors
async def signal_session(request: web.Request) -> web.Response:
    spec = await body(request, SignalBody)
    signum = parse_signal(spec.signal)
    return ok(await _ctl(request).sessions.signal(request.match_info["id"], signum))


@api_errors
async def kill_session(request: web.Request) -> web.Response:
    return ok(await _ctl(request).sessions.kill(request.match_info["id"]))


@api_errors
async def remove_session(request: web.Request) -> web.Response:
    await _ctl(request).sessions.remove(request.match_info["id"])
    return web.Response(status=204)


@api_errors
async def session_logs(request: web.Request) -> web.StreamResponse:
    """NDJSON: ``{"t":"out","stream":..,"offset":..,"data":base64}`` lines, a
    ``{"t":"truncated","from":a,"to":b}`` line for bytes dropped by the cap, and a final
    ``{"t":"end",...}`` (the session ended) or ``{"t":"eof","offset":n}`` (no follow)."""
    ctl = _ctl(request)
    sid = request.match_info["id"]
    start, tail = _start_params(request)
    follow = _query_flag(request, "follow") if "follow" in request.query else False
    attempts = _query_flag(request, "attempts") if "attempts" in request.query else False
    await ctl.sessions.get(sid)  # 404 before the answer starts
    start = await _start_offset(request, sid, start, tail)
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
        reason = e.message if isinstance(e, ShoalError) else str(e) or type(e).__name__
        last = {"t": "error", "offset": progress.offset,
                "message": f"reading the output failed: {reason}"}
    try:
        await resp.write(msgspec.json.encode(last) + b"\n")
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
                       ) -> dict[str, Any]:
    """Write the NDJSON output lines, keeping ``progress`` at the last byte written;
    returns the closing line to send. With ``attempts``, a line
    ``{"t":"attempt","attempt":n,"offset":o}`` marks where each placement's output begins."""
    async for item in outputlog.read(ctl.js, sid, progress.offset, follow=follow,
                                     is_over=session_over(ctl, sid), attempts=attempts):
        if isinstance(item, outputlog.Chunk) and item.stream == outputlog.ATTEMPT:
            line = {"t": "attempt", "attempt": item.epoch, "offset": item.offset}
            await resp.write(msgspec.json.encode(line) + b"\n")
            continue
        if isinstance(item, outputlog.Truncated):
            line = {"t": "truncated", "from": item.start, "to": item.end}
            await resp.write(msgspec.json.encode(line) + b"\n")
            progress.offset = item.end
            continue
        # Lines stay short enough for line-oriented readers (base64 grows data by a third).
        for at in range(0, len(item.data), LOG_LINE_BYTES):
            piece = item.data[at:at + LOG_LINE_BYTES]
            line = {"t": "out", "stream": item.stream, "offset": item.offset + at, "data": piece}
            await resp.write(msgspec.json.encode(line) + b"\n")
            progress.offset = item.offset + at + len(piece)
    position = progress.offset
    found = await ctl.sessions.store.get(sid)
    if found is None:  # removed while we read
        last: dict[str, Any] = {"t": "end", "offset": position, "state": "removed",
                                "exit_code": None, "signal": None, "reason": "removed"}
    elif found[0].state in FINAL and (follow or position >= found[0].output_bytes):
        record = found[0]
        last = {"t": "end", "offset": position, "state": record.state,
                "exit_code": record.exit_code, "signal": record.signal, "reason": record.reason}
    else:
        last = {"t": "eof", "offset": position}
    return last


# ---------------------------------------------------------------------- attach


ATTACHED_EVERY = 2.0


async def attach_session(request: web.Request) -> web.StreamResponse:
    """WebSocket: output replayed from ``?from=`` then live; input, resize from the client.

    Text frames are JSON control messages (hello, truncated, exit, error; resize from the
    client), binary frames are output (server -> client) or input (client -> server)."""
    ctl = _ctl(request)
    if not origin_ok(request, ctl.cfg.origins):
        return error_json(403, "WebSocket origin not allowed")
    sid = request.match_info["id"]
    allowed = request.get("session_scope")
    if allowed is not None and allowed != sid:
        return error_json(403, "this terminal link is for another session")
    try:
        start, tail = _start_params(request)
        record = await ctl.sessions.get(sid)
        start = await _start_offset(request, sid, start, tail)
    except Unavailable as e:
        return unavailable(e)
    except ShoalError as e:
        return error_json(e.status, e.message)
    except NATS_ERRORS as e:
        return nats_failure(e)
    if not ctl.sessions.sealed(record):  # written by someone holding an agent credential
        return error_json(409, f"session {sid} was not made by a controller (its record has "
                               "no valid seal): not attaching")
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=1 << 20)
    await ws.prepare(request)
    await ws.send_str(msgspec.json.encode({"t": "hello", "session": sid, "offset": start,
                                           "state": record.state}).decode())
    control = subjects.session_control(record.node, sid)
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
                    await ws.send_str(msgspec.json.encode(
                        {"t": "truncated", "from": item.start, "to": item.end}).decode())
                    progress.offset = item.end
                else:
                    await ws.send_bytes(item.data)
                    progress.offset = item.offset + len(item.data)
            final = await ctl.sessions.get(sid)
            frame: dict[str, Any] = {"t": "exit", "state": final.state,
                                     "code": final.exit_code, "signal": final.signal,
                                     "reason": final.reason}
        except ConnectionResetError:  # the client went away
            return
        except Exception as e:  # one boundary: the client hears why, and where to resume
            log.warning("attach to %s ended early at byte %d: %r", sid, progress.offset, e)
            reason = e.message if isinstance(e, ShoalError) else str(e) or type(e).__name__
            frame = {"t": "error", "status": 503, "offset": progress.offset,
                     "message": f"reading the output failed: {reason}"}
        if not ws.closed:
            await ws.send_str(msgspec.json.encode(frame).decode())

    async def pump_input() -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await publish(m.pack(m.SessionInput(data=msg.data)))
            elif msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    frame = msgspec.json.decode(msg.data, type=_ClientControl)
                except msgspec.DecodeError:
                    continue
                if frame.t == "resize" and frame.cols and frame.rows:
                    await publish(m.pack(m.Resize(
                        cols=max(1, min(frame.cols, 10000)), rows=max(1, min(frame.rows, 10000)))))
                elif frame.t == "eof":
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


class _ClientControl(msgspec.Struct):
    t: str
    cols: int = 0
    rows: int = 0


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/nodes", list_nodes)
    r.add_get("/api/v1/fleet", fleet_summary)
    r.add_get("/api/v1/nodes/{name}", show_node)
    r.add_post("/api/v1/nodes/{name}/drain", drain_node)
    r.add_post("/api/v1/nodes/{name}/undrain", undrain_node)
    r.add_delete("/api/v1/nodes/{name}", forget_node)
    r.add_post("/api/v1/sessions", create_session)
    r.add_get("/api/v1/sessions", list_sessions)
    r.add_get("/api/v1/sessions/{id}", show_session)
    r.add_delete("/api/v1/sessions/{id}", remove_session)
    r.add_post("/api/v1/sessions/{id}/signal", signal_session)
    r.add_post("/api/v1/sessions/{id}/kill", kill_session)
    r.add_get("/api/v1/sessions/{id}/logs", session_logs)
    r.add_get("/api/v1/sessions/{id}/attach", attach_session)
