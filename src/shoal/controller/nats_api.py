"""The same operations as the HTTP API, as JSON request/reply on NATS subjects.

Controllers subscribe as one queue group, so exactly one of them answers each request.
Subjects are ``shoal.api.<op>`` (docs/protocol.md lists them); a request is a JSON object,
a reply is ``{"ok": true, "result": ...}`` or ``{"ok": false, "status": N, "error": "..."}``.

Who asks: a request may carry an API token (header ``Authorization: Bearer TOKEN``); its
user and scopes then apply, checked here against the operation table (scopes.py) exactly
as the HTTP API checks them. Without one, the asker holds the controller's NATS credential
(agents may not publish here), which can read and write every bucket anyway: it is the
``nats`` user with the admin scope. State changes are audited either way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from ..errors import AuthError, Forbidden, NotFoundError, ShoalError, ValidationError
from ..natsio import outputlog
from ..wire import messages as m
from ..wire import subjects
from . import access, scopes
from .api import DrainBody, parse_signal
from .scopes import Principal

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


Op = Callable[[bytes, Principal], Awaitable[Any]]
NATS_CREDENTIAL = scopes.admin("nats", "nats-credential")


def _ignoring_caller(f: Callable[[bytes], Awaitable[Any]]) -> Op:
    async def op(data: bytes, principal: Principal) -> Any:
        return await f(data)
    return op


class NatsApi:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.subs: list[Subscription] = []
        # Read at call time: the table is built (and listed) before the controller starts.

        def decode(kind: type[Any], data: bytes) -> Any:
            return msgspec.json.decode(data or b"{}", type=kind)

        async def show_node(d: bytes) -> Any:
            name = decode(NameBody, d).name
            node = ctl.registry.node(name)
            if node is None:
                raise NotFoundError(f"no node named {name!r}")
            return node

        async def drain(d: bytes) -> Any:
            req = decode(DrainRequest, d)
            return {"remaining": await ctl.sessions.drain(req.name, req.deadline, req.wait)}

        async def undrain(d: bytes) -> Any:
            await ctl.sessions.set_draining(decode(NameBody, d).name, False)
            return {"draining": False}

        async def create(d: bytes, p: Principal) -> Any:
            record, created = await ctl.sessions.create(decode(m.SessionSpec, d), owner=p.user)
            return {"session": record, "created": created}

        async def list_(d: bytes) -> Any:
            q = decode(ListBody, d)
            return ctl.sessions.find(q.state, q.node, q.name, q.labels)

        async def show(d: bytes) -> Any:
            return await ctl.sessions.get(decode(IdBody, d).id)

        async def signal(d: bytes) -> Any:
            req = decode(SignalBody, d)
            return await ctl.sessions.signal(req.id, parse_signal(req.signal))

        async def kill(d: bytes) -> Any:
            return await ctl.sessions.kill(decode(IdBody, d).id)

        async def remove(d: bytes) -> Any:
            await ctl.sessions.remove(decode(IdBody, d).id)
            return {"removed": True}

        async def logs(d: bytes) -> Any:
            req = decode(LogsBody, d)
            await ctl.sessions.get(req.id)
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
            return ctl.registry.listing()

        plain: dict[str, Callable[[bytes], Awaitable[Any]]] = {
            "nodes.list": nodes, "nodes.show": show_node, "nodes.drain": drain,
            "nodes.undrain": undrain, "sessions.list": list_,
            "sessions.show": show, "sessions.signal": signal, "sessions.kill": kill,
            "sessions.remove": remove, "sessions.logs": logs,
        }
        from .services_api import service_ops
        from .tokens_api import token_ops

        plain.update(service_ops(ctl))
        self.ops: dict[str, Op] = {name: _ignoring_caller(f) for name, f in plain.items()}
        self.ops["sessions.create"] = create
        self.ops.update(token_ops(ctl))

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

    async def _caller(self, msg: Msg) -> Principal:
        header = (msg.headers or {}).get("Authorization", "")
        if not header:
            return NATS_CREDENTIAL
        token = header[7:].strip() if header.startswith("Bearer ") else ""
        principal = await self.ctl.api_tokens.authenticate(token)
        if principal is None:
            raise AuthError("the token in the Authorization header is wrong, expired or "
                            "revoked (send 'Authorization: Bearer TOKEN', or no header to act "
                            "with the controller's NATS credential)")
        return principal

    async def _authorized(self, op: str, data: bytes, principal: Principal) -> Any:
        """The scope check, the operation, and its audit entry: the dispatcher's one path."""
        rule = scopes.OPS[op]
        try:
            body: Any = msgspec.json.decode(data or b"{}")
        except msgspec.DecodeError:
            body = None  # the operation says why
        reach = access.reach_of_body(op, body)
        try:
            targets = await access.authorize(self.ctl, principal, op, reach)
        except Forbidden as e:
            if not rule.reads:
                await self.ctl.audit.record(access.entry(principal, "nats", op, [], 403,
                                                         f"refused: {e.message}", reach))
            raise
        if not rule.audit:
            return await self.ops[op](data, principal)
        status, result = 500, "failed"
        try:
            answer = await self.ops[op](data, principal)
            status, result = 200, "ok"
            if rule.target is scopes.Target.SPEC:
                targets = access.created(msgspec.to_builtins(answer), targets)
            return answer
        except ShoalError as e:
            status = e.status
            raise
        except msgspec.ValidationError:
            status = 422
            raise
        except msgspec.DecodeError:
            status = 400
            raise
        finally:
            await self.ctl.audit.record(access.entry(principal, "nats", op, targets, status,
                                                     result, reach))

    async def _handle(self, msg: Msg) -> None:
        op = msg.subject[len(subjects.api("")):]
        try:
            if len(msg.data) > 1 << 20:
                raise ValidationError("request too large (max 1 MiB)")
            result = await self._authorized(op, msg.data, await self._caller(msg))
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
