"""Tokens, the audit trail and "who am I" (``/api/v1/tokens``, ``/api/v1/audit``,
``/api/v1/whoami``; NATS ``tokens.*``, ``audit.*``, ``whoami``; declared in operations.py).
Handlers are thin; the scope check happened before them (auth.py, nats_api.py)."""

from __future__ import annotations

from typing import Any

from ..errors import AuthError
from ..wire import api as w
from .apitokens import NewToken
from .audit import Entry
from .context import Call
from .scopes import Principal


def _principal(c: Call) -> Principal:
    if c.principal is None:
        raise AuthError("this needs an API token: send 'Authorization: Bearer TOKEN'")
    return c.principal


async def list_tokens(c: Call, _: w.Empty) -> list[dict[str, Any]]:
    return c.ctl.api_tokens.listing()


async def create_token(c: Call, req: NewToken) -> dict[str, Any]:
    token, record = await c.ctl.api_tokens.create(req, by=_principal(c).user)
    return {**record.view(), "token": token}


async def revoke_token(c: Call, r: w.TokenRef) -> dict[str, Any]:
    return (await c.ctl.api_tokens.revoke(r.id)).view()


async def list_audit(c: Call, q: w.AuditQuery) -> list[Entry]:
    return list(await c.ctl.audit.query(q.user or None, q.since, q.limit))


async def verify_audit(c: Call, _: w.Empty) -> dict[str, Any]:
    count, problems = await c.ctl.audit.verify()
    return {"ok": not problems, "entries": count, "problems": problems}


async def whoami(c: Call, _: w.Empty) -> w.Whoami:
    p = _principal(c)
    return w.Whoami(user=p.user, token=p.token_id, scopes=p.scopes)
