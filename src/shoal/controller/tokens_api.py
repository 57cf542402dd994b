"""Tokens, the audit trail and "who am I" in the HTTP API (``/api/v1/tokens``,
``/api/v1/audit``, ``/api/v1/whoami``) and the NATS API (``tokens.*``, ``audit.*``,
``whoami``). Handlers are thin; the scope check happened before them (auth.py, nats_api.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from ..errors import ValidationError
from .api import api_errors, body, ok
from .apitokens import NewToken
from .scopes import Principal

if TYPE_CHECKING:
    from .server import Controller

MAX_AUDIT = 10000


def _ctl(request: web.Request) -> Controller:
    return request.app["controller"]  # type: ignore[no-any-return]


def _principal(request: web.Request) -> Principal:
    return request["principal"]  # type: ignore[no-any-return]


def whoami_view(p: Principal) -> dict[str, Any]:
    return {"user": p.user, "token": p.token_id, "scopes": p.scopes}


async def _create(ctl: Controller, p: Principal, req: NewToken) -> dict[str, Any]:
    token, record = await ctl.api_tokens.create(req, by=p.user)
    return {**record.view(), "token": token}


async def _audit(ctl: Controller, user: str | None, since: float | None,
                 limit: int) -> list[Any]:
    if not 1 <= limit <= MAX_AUDIT:
        raise ValidationError(f"limit must be between 1 and {MAX_AUDIT}")
    return list(await ctl.audit.query(user, since, limit))


async def _verify(ctl: Controller) -> dict[str, Any]:
    count, problems = await ctl.audit.verify()
    return {"ok": not problems, "entries": count, "problems": problems}


@api_errors
async def list_tokens(request: web.Request) -> web.Response:
    return ok(_ctl(request).api_tokens.listing())


@api_errors
async def create_token(request: web.Request) -> web.Response:
    req = await body(request, NewToken)
    return ok(await _create(_ctl(request), _principal(request), req), 201)


@api_errors
async def revoke_token(request: web.Request) -> web.Response:
    record = await _ctl(request).api_tokens.revoke(request.match_info["id"])
    return ok(record.view())


def _query_float(request: web.Request, name: str) -> float | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ValidationError(f"query parameter {name} must be a number (Unix time), not "
                              f"{raw!r}") from None


@api_errors
async def list_audit(request: web.Request) -> web.Response:
    limit = _query_float(request, "limit")
    return ok(await _audit(_ctl(request), request.query.get("user") or None,
                           _query_float(request, "since"), int(limit or 1000)))


@api_errors
async def verify_audit(request: web.Request) -> web.Response:
    return ok(await _verify(_ctl(request)))


@api_errors
async def whoami(request: web.Request) -> web.Response:
    return ok(whoami_view(_principal(request)))


def add_token_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/tokens", list_tokens)
    r.add_post("/api/v1/tokens", create_token)
    r.add_delete("/api/v1/tokens/{id}", revoke_token)
    r.add_get("/api/v1/audit", list_audit)
    r.add_get("/api/v1/audit/verify", verify_audit)
    r.add_get("/api/v1/whoami", whoami)


# ---------------------------------------------------------------------- NATS

class _Id(msgspec.Struct, forbid_unknown_fields=True):
    id: str


class _AuditQuery(msgspec.Struct, forbid_unknown_fields=True):
    user: str | None = None
    since: float | None = None
    limit: int = 1000


NatsOp = Callable[[bytes, Principal], Awaitable[Any]]


def token_ops(ctl: Controller) -> dict[str, NatsOp]:
    def decode(kind: type[Any], data: bytes) -> Any:
        return msgspec.json.decode(data or b"{}", type=kind)

    async def list_(d: bytes, p: Principal) -> Any:
        return ctl.api_tokens.listing()

    async def create(d: bytes, p: Principal) -> Any:
        return await _create(ctl, p, decode(NewToken, d))

    async def revoke(d: bytes, p: Principal) -> Any:
        return (await ctl.api_tokens.revoke(decode(_Id, d).id)).view()

    async def audit(d: bytes, p: Principal) -> Any:
        q = decode(_AuditQuery, d)
        return await _audit(ctl, q.user, q.since, q.limit)

    async def verify(d: bytes, p: Principal) -> Any:
        return await _verify(ctl)

    async def me(d: bytes, p: Principal) -> Any:
        return whoami_view(p)

    return {"tokens.list": list_, "tokens.create": create, "tokens.revoke": revoke,
            "audit.list": audit, "audit.verify": verify, "whoami": me}
