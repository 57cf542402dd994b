"""API tokens of named users: created, listed and revoked through the API, kept in the
``shoal-tokens`` bucket that every controller shares, and checked against a cache that a
watch of the bucket keeps current (a revoked token is refused everywhere within a moment).

A token is ``shoal_<id>_<secret>``: the id names it (lists, revocation, the audit trail),
the secret is 256 random bits. The bucket keeps only the SHA-256 of the whole token. A fast
hash is enough because the secret is random, not a password a person chose: nobody can
guess 256 bits, with or without a slow hash, and a slow hash would only make every API call
slower. A copy of the bucket therefore opens nothing.

The controller's own token (``token`` in controller.toml, what ``shoal up`` prints) is the
built-in token ``admin`` of user ``admin``; it is not in the bucket and is changed by
changing the configuration.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING

import msgspec

from ..errors import ConflictError, NotFoundError, Unavailable, ValidationError
from ..natsio import bus, kv
from ..system.tasks import end_tasks
from .scopes import Principal, admin, parse_grants

if TYPE_CHECKING:
    from ..natsio.types import JetStreamContext, KeyValue

log = logging.getLogger(__name__)

BUCKET = "shoal-tokens"
PREFIX = "shoal_"
ADMIN_ID = "admin"
_ID = re.compile(r"^[0-9a-f]{12}$")
USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MAX_LIFETIME = 10 * 366 * 86400.0


class TokenRecord(msgspec.Struct, frozen=True):
    id: str
    user: str
    scopes: list[str]
    created: float
    expires: float  # 0: never
    created_by: str = ""
    hash: str = ""  # SHA-256 of the whole token, hex

    def view(self) -> dict[str, object]:
        """What the API shows (never the hash)."""
        return {"id": self.id, "user": self.user, "scopes": self.scopes,
                "created": self.created, "expires": self.expires,
                "created_by": self.created_by,
                "expired": bool(self.expires) and self.expires < time.time()}


class NewToken(msgspec.Struct, forbid_unknown_fields=True):
    user: str
    scopes: list[str]
    expires: float | None = None  # seconds from now; None: never


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id(token: str) -> str | None:
    if not token.startswith(PREFIX):
        return None
    parts = token.split("_", 2)
    if len(parts) != 3 or not _ID.match(parts[1]) or len(parts[2]) < 32:
        return None
    return parts[1]


def parse_lifetime(text: str) -> float | None:
    """``30d``, ``12h``, ``90m``, ``3600s`` or ``never`` (None)."""
    text = text.strip().lower()
    if text in ("never", "0", ""):
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    number, unit = (text[:-1], text[-1]) if text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ValidationError(f"expiry {text!r}: give a lifetime such as 30d, 12h, 90m or "
                              "never") from None
    if not 0 < value <= MAX_LIFETIME:
        raise ValidationError(f"expiry {text!r}: between 1 second and 10 years")
    return value


class TokenStore:
    def __init__(self, admin_token: str) -> None:
        self.admin_token = admin_token
        self.kv: KeyValue | None = None
        self.records: dict[str, TokenRecord] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, js: JetStreamContext, replicas: int = 1) -> None:
        self.kv = await kv.ensure(js, BUCKET, replicas=replicas)
        ready = asyncio.Event()
        self._task = asyncio.create_task(bus.watch_bucket(self.kv, self._apply, ready.set,
                                                          "tokens"))
        try:
            await asyncio.wait_for(ready.wait(), 10)
        except TimeoutError:
            log.warning("tokens bucket slow to load; continuing")

    async def stop(self) -> None:
        await end_tasks([self._task])

    def _apply(self, key: str, value: bytes | None) -> None:
        bus.mirror(self.records, lambda b: msgspec.json.decode(b, type=TokenRecord), key,
                   value)

    async def authenticate(self, token: str) -> Principal | None:
        """Who a bearer token belongs to, or None (unknown, wrong, expired or revoked)."""
        if not token:
            return None
        if hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return admin()
        tid = token_id(token)
        if tid is None:
            return None
        record = self.records.get(tid)
        if record is None:
            record = await self._fetch(tid)  # made a moment ago on another controller
        if record is None or not hmac.compare_digest(record.hash, digest(token)):
            return None
        return self.principal(record)

    def by_id(self, tid: str) -> Principal | None:
        """The principal of a token by its id (a browser login remembers only the id)."""
        if tid == ADMIN_ID:
            return admin()
        record = self.records.get(tid)
        return self.principal(record) if record is not None else None

    @staticmethod
    def principal(record: TokenRecord) -> Principal | None:
        if record.expires and record.expires < time.time():
            return None
        try:
            grants = parse_grants(record.scopes)
        except ValidationError:
            return None
        return Principal(record.user, record.id, grants)

    async def _fetch(self, tid: str) -> TokenRecord | None:
        if self.kv is None:
            return None
        found = await kv.get(self.kv, tid)
        if found is None:
            return None
        try:
            return msgspec.json.decode(found[0], type=TokenRecord)
        except msgspec.DecodeError:
            return None

    def listing(self) -> list[dict[str, object]]:
        builtin = {"id": ADMIN_ID, "user": "admin", "scopes": ["admin"], "created": 0.0,
                   "expires": 0.0, "created_by": "controller.toml", "expired": False}
        return [builtin, *(r.view() for r in sorted(self.records.values(),
                                                     key=lambda r: r.created))]

    async def create(self, req: NewToken, by: str) -> tuple[str, TokenRecord]:
        """A new token: the token itself (shown once) and its record."""
        if self.kv is None:
            raise Unavailable("the controller is starting; try again")
        if not USER.match(req.user):
            raise ValidationError(f"user {req.user!r}: letters, digits and _.@- (up to 64)")
        grants = parse_grants(req.scopes)
        if req.expires is not None and not 0 < req.expires <= MAX_LIFETIME:
            raise ValidationError("expires: seconds from now, between 1 and 10 years")
        tid = secrets.token_hex(6)
        token = f"{PREFIX}{tid}_{secrets.token_urlsafe(32)}"
        now = time.time()
        record = TokenRecord(id=tid, user=req.user, scopes=[str(g) for g in grants],
                             created=now, expires=now + req.expires if req.expires else 0.0,
                             created_by=by, hash=digest(token))
        if await kv.create(self.kv, tid, msgspec.json.encode(record)) is None:
            raise ConflictError(f"token id {tid} is taken (a one in 2^48 chance); try again")
        self.records[tid] = record
        return token, record

    async def revoke(self, tid: str) -> TokenRecord:
        if tid == ADMIN_ID:
            raise ValidationError("the admin token is the controller's own (token in "
                                  "controller.toml): change it there and restart")
        if self.kv is None:
            raise Unavailable("the controller is starting; try again")
        record = self.records.get(tid) or (await self._fetch(tid) if _ID.match(tid) else None)
        if record is None:
            raise NotFoundError(f"no token {tid!r}; `shoal token list` shows them")
        await kv.purge(self.kv, tid)
        self.records.pop(tid, None)
        return record
