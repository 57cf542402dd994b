"""The HTTP routes of the operation table (operations.py): a ``call`` operation's request
is decoded once into its struct (path fields from the path, the rest from the JSON body or
the query string), checked (wire.messages.check), handed to its handler, and the result
encoded; every error goes through the one error map (replies.py). Streams and websockets
are routed to their own handlers. The scope check happened before (auth.py)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..errors import ShoalError, ValidationError
from ..wire import messages as m
from . import api, replies
from .context import Call
from .openapi import openapi_handler
from .operations import TABLE, Http, Operation, http_body
from .proxy import add_redirect_routes

if TYPE_CHECKING:
    from .server import Controller

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
_QUERY_METHODS = ("GET", "DELETE", "HEAD")


def add_routes(app: web.Application) -> None:
    """Every route of the table this module serves; the rest (pages, the terminal pool,
    logins, metrics, health, the services redirect) their modules add."""
    for op in TABLE:
        for route in op.http:
            if route.handler is not None:
                app.router.add_route(route.method, route.path, route.handler)
            elif op.kind == "call" and not route.where:
                app.router.add_route(route.method, route.path, _handler(op, route))
    app.router.add_get("/api/v1/openapi.json", openapi_handler)
    add_redirect_routes(app)


def _handler(op: Operation, route: Http) -> api.Handler:
    assert op.handler is not None, op.name
    handle = op.handler
    view = route.view or (lambda result: api.ok(result, route.status))

    async def serve(request: web.Request) -> web.StreamResponse:
        ctl: Controller = request.app["controller"]
        try:
            req = await decode(request, op, route)
            return view(await handle(Call(ctl, request.get("principal")), req))
        except Exception as e:
            if replies.is_nats_failure(e):
                log.warning("%s %s: NATS failed: %r", request.method, request.path, e)
            elif replies.status_of(e) >= 500 and not isinstance(e, ShoalError):
                log.exception("%s %s failed", request.method, request.path)
            return replies.error_response(e)

    serve.__name__ = op.name.replace(".", "_")
    return serve


async def decode(request: web.Request, op: Operation, route: Http) -> Any:
    """The operation's request struct from an HTTP request; refused as the NATS API
    refuses the same body (the same struct, the same checks)."""
    kind = op.request
    body_kind = http_body(op, route)
    if kind is None or body_kind is None:
        return None
    if request.method in _QUERY_METHODS:
        fields = body_kind.__struct_fields__
        raw = route.from_query(request.query) if route.from_query else {
            k: v for k, v in request.query.items() if k in fields}
        try:
            part = msgspec.convert(raw, body_kind, strict=False)
        except msgspec.ValidationError as e:  # a query string is not a typed body: 400
            raise ValidationError(f"bad query parameter: {e}") from e
    elif not body_kind.__struct_fields__:
        part = body_kind()  # nothing to read: what a client sends here is ignored, as ever
    else:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise ValidationError(f"body too large (max {MAX_BODY} bytes)")
        part = msgspec.json.decode(await request.read() or b"{}", type=body_kind)
    if body_kind is not kind:
        fields = {f: getattr(part, f) for f in body_kind.__struct_fields__}
        part = kind(**fields, **{k: v for k, v in request.match_info.items()
                                 if k in kind.__struct_fields__})
    m.check(part)
    return part
