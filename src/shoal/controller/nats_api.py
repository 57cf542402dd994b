"""The same operations as the HTTP API, as JSON request/reply on NATS subjects.

Controllers subscribe as one queue group, so exactly one of them answers each request.
Subjects are ``shoal.api.<op>`` (docs/protocol.md lists them); a request is a JSON object,
a reply is ``{"ok": true, "result": ...}`` or ``{"ok": false, "status": N, "error": "..."}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from .. import messages as m
from .. import outputlog, subjects
from ..errors import NotFoundError, ShoalError, ValidationError
from .api import DrainBody, parse_signal

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from .server import Controller

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 512 << 10


class IdBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str


class NameBody(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class ListBody(msgspec.Struct, forbid_unknown_fields=True):
    state: str | None = None
    node: str | None = None
    name: str | None = None
    labels: dict[str, str] = {}


class SignalBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    signal: str | int = "TERM"


class DrainRequest(DrainBody, forbid_unknown_fields=True):
    name: str = ""


class LogsBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    offset: int = 0
    max_bytes: Annotated[int, msgspec.Meta(ge=1, le=MAX_LOG_BYTES)] = MAX_LOG_BYTES


Op = Callable[[bytes], Awaitable[Any]]


class NatsApi:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.subs: list[Subscription] = []
        s = ctl.sessions
        reg = ctl.registry

        def decode(kind: type[Any], data: bytes) -> Any:
            return msgspec.json.decode(data or b"{}", type=kind)

        async def show_node(d: bytes) -> Any:
            name = decode(NameBody, d).name
            node = reg.node(name)
            if node is None:
                raise NotFoundError(f"no node named {name!r}")
            return node

        async def drain(d: bytes) -> Any:
            req = decode(DrainRequest, d)
            return {"remaining": await s.drain(req.name, req.deadline, req.wait)}

        async def undrain(d: bytes) -> Any:
            await s.set_draining(decode(NameBody, d).name, False)
            return {"draining": False}

        async def create(d: bytes) -> Any:
            record, created = await s.create(decode(m.SessionSpec, d))
            return {"session": record, "created": created}

        async def list_(d: bytes) -> Any:
            q = decode(ListBody, d)
            return s.find(q.state, q.node, q.name, q.labels)

        async def show(d: bytes) -> Any:
            return await s.get(decode(IdBody, d).id)

        async def signal(d: bytes) -> Any:
            req = decode(SignalBody, d)
            return await s.signal(req.id, parse_signal(req.signal))

        async def kill(d: bytes) -> Any:
            return await s.kill(decode(IdBody, d).id)

        async def remove(d: bytes) -> Any:
            await s.remove(decode(IdBody, d).id)
            return {"removed": True}

        async def logs(d: bytes) -> Any:
            req = decode(LogsBody, d)
            await s.get(req.id)
            chunks: list[dict[str, Any]] = []
            size = 0
            async for item in outputlog.read(ctl.js, req.id, req.offset):
                if isinstance(item, outputlog.Truncated):
                    chunks.append({"t": "truncated", "from": item.start, "to": item.end})
                    continue
                chunks.append({"t": "out", "stream": item.stream, "offset": item.offset,
                               "data": item.data})
                size += len(item.data)
                if size >= req.max_bytes:
                    break
            return chunks

        async def nodes(d: bytes) -> Any:
            return reg.listing()

        self.ops: dict[str, Op] = {
            "nodes.list": nodes, "nodes.show": show_node, "nodes.drain": drain,
            "nodes.undrain": undrain, "sessions.create": create, "sessions.list": list_,
            "sessions.show": show, "sessions.signal": signal, "sessions.kill": kill,
            "sessions.remove": remove, "sessions.logs": logs,
        }
        from .services_api import service_ops

        self.ops.update(service_ops(ctl))

    async def start(self) -> None:
        for op in self.ops:
            self.subs.append(await self.ctl.nc.subscribe(
                subjects.api(op), queue=subjects.CONTROLLERS_QUEUE, cb=self._handle))

    async def stop(self) -> None:
        for sub in self.subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _handle(self, msg: Msg) -> None:
        op = msg.subject[len(subjects.api("")):]
        try:
            if len(msg.data) > 1 << 20:
                raise ValidationError("request too large (max 1 MiB)")
            result = await self.ops[op](msg.data)
            reply: dict[str, Any] = {"ok": True, "result": result,
                                     "controller": self.ctl.instance}
        except ShoalError as e:
            reply = {"ok": False, "status": e.status, "error": e.message}
        except msgspec.ValidationError as e:
            reply = {"ok": False, "status": 422, "error": f"invalid request: {e}"}
        except msgspec.DecodeError as e:
            reply = {"ok": False, "status": 400, "error": f"the request is not valid JSON: {e}"}
        except Exception as e:
            log.exception("NATS API %s failed", op)
            reply = {"ok": False, "status": 500, "error": f"internal error: {e}"}
        if msg.reply:
            await msg.respond(m.to_json(reply))
