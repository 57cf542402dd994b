"""``GET /api/v1/run`` (WebSocket): one fan-out run per connection.

Frames are msgpack (``shoal.wire.messages.ClientFrame`` in, ``ServerFrame`` out). The client sends
``RunStart`` first; the server answers ``RunPlan`` (or ``ErrorFrame`` and closes), then streams
events until ``RunDone``. Closing the socket early cancels the run on every node.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import aiohttp
import msgspec
from aiohttp import web

from ..errors import Forbidden, ShoalError, ValidationError
from ..logic.nodegroups import GroupsError
from ..logic.targets import select
from ..wire import messages as m
from . import access
from .audit import argv_digest
from .auth import client_address, error_json, origin_ok
from .fanout import FanoutRun, Forward, Roll

if TYPE_CHECKING:
    from .scopes import Principal
    from .server import Controller

log = logging.getLogger(__name__)

START_TIMEOUT = 10.0
MAX_FRAME = 8 << 20


async def handle_run(request: web.Request) -> web.StreamResponse:
    ctl: Controller = request.app["controller"]
    if not origin_ok(request, ctl.cfg.origins):
        return error_json(403, "WebSocket origin not allowed")
    principal: Principal | None = request.get("principal")
    if principal is None:
        return error_json(401, "a run needs an API token")
    ws = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=20, compress=False)
    await ws.prepare(request)
    try:
        await _serve(ctl, ws, principal, client_address(request, ctl.cfg.trusted_proxies))
    finally:
        await ws.close()
    return ws


async def _send(ws: web.WebSocketResponse, frame: m.ServerFrame) -> None:
    await ws.send_bytes(m.pack(frame))


async def _fail(ws: web.WebSocketResponse, status: int, message: str) -> None:
    await _send(ws, m.ErrorFrame(status=status, message=message))


async def _serve(ctl: Controller, ws: web.WebSocketResponse, principal: Principal,
                 source: str) -> None:
    try:
        first = await ws.receive(timeout=START_TIMEOUT)
    except TimeoutError:
        await _fail(ws, 408, f"no start frame within {START_TIMEOUT:g}s")
        return
    if first.type != aiohttp.WSMsgType.BINARY:
        await _fail(ws, 400, "expected a binary msgpack RunStart frame")
        return
    try:
        start = m.unpack(first.data, m.RunStart)
        start.spec.validate()  # as the sessions API checks a spec: wire.messages
        snapshot = ctl.registry.snapshot()
        nodes = select(start.targets, snapshot, ctl.groups.get())
        if start.spec.tty and len(nodes) != 1:
            raise ValidationError(f"--tty needs exactly one node; the selection has {len(nodes)}")
        roll = Roll(start.batch, start.batch_percent, start.fanout, start.keep_going)
        if roll.rolling and start.spec.stdin:
            raise ValidationError("--stdin does not combine with --batch or --fanout: the"
                                  " nodes of a later slice would miss what was sent")
        argv = start.spec.argv or ([start.spec.shell] if start.spec.shell else None)
        digest = argv_digest(start.spec.argv, start.spec.shell)
        try:
            access.check_run(ctl, principal, nodes)  # refused, never narrowed: scopes.py
        except Forbidden as e:
            await ctl.audit.record(access.entry(principal, source, "run", nodes, 403,
                                                f"refused: {e.message}", argv=argv,
                                                digest=digest))
            raise
    except msgspec.ValidationError as e:
        await _fail(ws, 400, f"invalid run request: {e}")
        return
    except msgspec.DecodeError as e:
        await _fail(ws, 400, f"undecodable run request: {e}")
        return
    except ShoalError as e:
        await _fail(ws, e.status, e.message)
        return
    except GroupsError as e:
        await _fail(ws, 500, f"the controller's groups file: {e}")
        return

    async def sink(events: list[m.RunEvent | Forward]) -> None:
        # Output from agents goes on as they framed it; what lies between goes in one frame.
        together: list[m.RunEvent] = []
        for ev in events:
            if isinstance(ev, Forward):
                await _send_events(ws, together)
                together = []
                if not ws.closed:
                    await ws.send_bytes(ev.frame)
            else:
                together.append(ev)
        await _send_events(ws, together)

    down = {n for n in nodes if snapshot[n].state == "down"}
    run = FanoutRun(ctl.nc, nodes, start.spec, sink, down=down,
                    connect_timeout=start.connect_timeout, node_down=ctl.registry.is_down,
                    roll=roll, groups=ctl.registry.groups(nodes))
    await ctl.audit.record(access.entry(principal, source, "run", nodes, 200,
                                        f"started {run.run_id}", argv=argv, digest=digest))
    await _send(ws, m.RunPlan(run_id=run.run_id, nodes=nodes))
    await run.start()
    reader = asyncio.create_task(_read_client(ws, run))
    waiter = asyncio.create_task(run.wait())
    try:
        await asyncio.wait([reader, waiter], return_when=asyncio.FIRST_COMPLETED)
        if waiter.done():
            await waiter
            await _send(ws, m.RunDone())
        else:
            await run.cancel("the client disconnected")
    finally:
        reader.cancel()
        waiter.cancel()
        await run.close()


async def _send_events(ws: web.WebSocketResponse, events: list[m.RunEvent]) -> None:
    if events and not ws.closed:
        await ws.send_bytes(m.pack(events[0] if len(events) == 1 else m.RunEvents(events)))


async def _read_client(ws: web.WebSocketResponse, run: FanoutRun) -> None:
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.BINARY:
            continue
        try:
            frame = m.unpack_client_frame(msg.data)
        except msgspec.DecodeError as e:
            await _fail(ws, 400, f"bad frame: {e}")
            continue
        if isinstance(frame, m.StdinData):
            await run.send_stdin(frame.data, frame.eof)
        elif isinstance(frame, m.Resize):
            await run.resize(frame.cols, frame.rows)
        elif isinstance(frame, m.SignalRun):
            await run.signal(frame.signum)
        elif isinstance(frame, m.Cancel):
            await run.cancel(frame.reason)
