"""The same operations as the HTTP API, as JSON request/reply on NATS subjects.

Controllers subscribe as one queue group, so exactly one of them answers each request.
Subjects are ``shoal.api.<op>`` (docs/protocol.md lists them); a request is a JSON object,
a reply is ``{"ok": true, "result": ...}`` or ``{"ok": false, "status": N, "error": "..."}``.

Who asks: a request may carry an API token (header ``Authorization: Bearer TOKEN``); its
user and scopes then apply, checked here against the operation table (operations.py) exactly
as the HTTP API checks them. Without one, the asker holds the controller's NATS credential
(agents may not publish here), which can read and write every bucket anyway: it is the
``nats`` user with the admin scope. State changes are audited either way.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import AuthError, Forbidden, ValidationError
from ..wire import api as w
from ..wire import messages as m
from ..wire import subjects
from . import access, replies, scopes
from .context import Call
from .operations import OPS, Operation
from .scopes import Principal

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from .server import Controller

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
Op = Callable[[bytes, Principal], Awaitable[Any]]
NATS_CREDENTIAL = scopes.admin("nats", "nats-credential")


class NatsApi:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.subs: list[Subscription] = []
        self.ops: dict[str, Op] = {op.name: self._op(op) for op in OPS.values() if op.nats}

    def _op(self, op: Operation) -> Op:
        """The operation's request struct decoded from the body (the same struct and the
        same checks as over HTTP), its handler, and its result as NATS answers it."""
        assert op.handler is not None and op.request is not None, op.name
        handle, kind, view = op.handler, op.request, op.nats_view

        async def serve(data: bytes, principal: Principal) -> Any:
            req = msgspec.json.decode(data or b"{}", type=kind)
            m.check(req)
            result = await handle(Call(self.ctl, principal), req)
            return view(result) if view is not None else result

        return serve

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
        rule = OPS[op]
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
        except Exception as e:
            status = replies.status_of(e)
            raise
        finally:
            await self.ctl.audit.record(access.entry(principal, "nats", op, targets, status,
                                                     result, reach))

    async def _handle(self, msg: Msg) -> None:
        op = msg.subject[len(subjects.api("")):]
        reply: w.NatsReply
        try:
            if len(msg.data) > MAX_REQUEST:
                raise ValidationError("request too large (max 1 MiB)")
            result = await self._authorized(op, msg.data, await self._caller(msg))
            reply = w.NatsReply(ok=True, result=result, controller=self.ctl.instance)
        except Exception as e:
            if replies.status_of(e) >= 500 and not replies.is_nats_failure(e):
                log.exception("NATS API %s failed", op)
            reply = replies.nats_error(e)
        if msg.reply:
            await msg.respond(m.to_json(reply))
