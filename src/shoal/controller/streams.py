"""The two HTTP operations that are not one request and one answer: a session's output
as NDJSON lines (``sessions.logs``, following it if asked) and the attach WebSocket
(``sessions.attach``). Declared in operations.py like the rest; every frame is a struct
of wire/api.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
import msgspec
from aiohttp import web

from ..errors import ValidationError
from ..logic.sessionstate import FINAL, attempt_nodes
from ..natsio import outputlog
from ..natsio.bus import NATS_ERRORS
from ..wire import api as w
from ..wire import messages as m
from ..wire import subjects
from . import replies
from .auth import origin_ok

if TYPE_CHECKING:
    from .server import Controller

log = logging.getLogger(__name__)

LOG_LINE_BYTES = 192 << 10
MAX_OFFSET = w.MAX_OFFSET


def _ctl(request: web.Request) -> Controller:
    return request.app["controller"]  # type: ignore[no-any-return]


def _query_flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("1", "0", "true", "false", "yes", "no", ""):
        raise ValidationError(f"query parameter {name} must be true or false")
    return value in ("1", "true", "yes", "")


async def _start_offset(request: web.Request, sid: str, start: int, tail: int | None) -> int:
    """``?from=N``, or ``?tail=N`` bytes before the end of what is stored."""
    if tail is None:
        return start
    ctl = _ctl(request)
    nodes = await session_nodes(ctl, sid)()
    return max(0, await outputlog.end_offset(ctl.js, sid, nodes) - tail)


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


def session_nodes(ctl: Controller, sid: str) -> Callable[[], Awaitable[list[str]]]:
    """For ``outputlog.read``: the node of each of the session's attempts, whose output
    readers believe (none once it is removed)."""
    async def nodes() -> list[str]:
        found = await ctl.sessions.store.get(sid)
        return attempt_nodes(found[0]) if found is not None else []
    return nodes


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
                                     is_over=session_over(ctl, sid), attempts=attempts,
                                     nodes=session_nodes(ctl, sid)):
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
                                             is_over=session_over(ctl, sid),
                                             nodes=session_nodes(ctl, sid)):
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
