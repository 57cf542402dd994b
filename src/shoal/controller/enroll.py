"""Node identities: join tokens, enrollment, renewal and revocation (docs/security.md,
"Node identities").

Only with ``identity`` in controller.toml (the fleet's signing keys, shoal.identity.authority;
``shoal up`` makes them, its default). A join token (``shoal token create --join``) is
``shoal-join_<id>_<secret>``; the ``shoal-join`` bucket keeps its SHA-256, what it fixes
(labels, a name) and how many names it may still enroll. ``POST /api/v1/enroll`` takes the
token, the node's public key and its names, and answers a user JWT for that key whose
permissions name those nodes only. The ``shoal-identities`` bucket keeps one record per
enrolled name: a name already there is refused. Revoking a node puts its key in the account
JWT's revocations and pushes the account to the servers (through the system account): the
server closes the node's connection at once and refuses its credential from then on.
Renewal: the agent asks on ``shoal.identity.renew.<lead>``, which only its own credential
may publish to, so the server has already said who asks.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import hmac
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from nats.aio.client import RawCredentials

from ..errors import ConflictError, NotFoundError, Unavailable, ValidationError
from ..identity import claims
from ..identity.authority import Authority
from ..natsio import bus, kv
from ..natsio.bus import NATS_ERRORS
from ..system.tasks import end_tasks
from ..wire import enrollment as w
from ..wire import hostbeat, subjects
from ..wire.api import Named

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext

    from .context import Call
    from .server import Controller

log = logging.getLogger(__name__)

JOIN_BUCKET = "shoal-join"
IDENTITIES_BUCKET = "shoal-identities"
RENEW_QUEUE = "shoal-identity"
DEFAULT_LIFETIME = 24 * 3600.0  # a node credential's; the agent renews at two thirds


class JoinRecord(msgspec.Struct, frozen=True):
    id: str
    hash: str  # SHA-256 of the whole token, hex
    created: float
    expires: float
    uses: int  # names it may still enroll
    labels: dict[str, str] = {}
    name: str = ""
    created_by: str = ""


class IdentityRecord(msgspec.Struct, frozen=True):
    name: str
    lead: str  # the first name of the credential (one agent process may serve several)
    names: list[str]
    public_key: str
    labels: dict[str, str]
    enrolled: float
    token_id: str
    revoked: float = 0.0  # epoch seconds; 0: not revoked


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Enrollment:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.authority: Authority | None = None
        if ctl.cfg.identity:
            self.authority = Authority.load(Path(ctl.cfg.identity).expanduser())
        self.lifetime = ctl.cfg.node_credential_lifetime or DEFAULT_LIFETIME
        self.join: kv.KeyValue | None = None
        self.ids: kv.KeyValue | None = None
        self._sub: Any = None
        self._watch: asyncio.Task[None] | None = None
        self.identities: dict[str, IdentityRecord] = {}  # a mirror of the bucket

    @property
    def enabled(self) -> bool:
        return self.authority is not None

    def _need(self) -> Authority:
        if self.authority is None:
            raise ConflictError("this fleet has no node identities (its agents share one NATS "
                                "user): see docs/security.md, 'Moving to node identities'")
        return self.authority

    async def start(self, nc: NatsClient, js: JetStreamContext, replicas: int) -> None:
        if self.authority is None:
            return
        self.join = await kv.ensure(js, JOIN_BUCKET, replicas=replicas)
        self.ids = await kv.ensure(js, IDENTITIES_BUCKET, replicas=replicas)
        loaded = asyncio.Event()
        self._watch = asyncio.create_task(bus.watch_bucket(self.ids, self._mirror, loaded.set,
                                                           "identities"))
        try:
            await asyncio.wait_for(loaded.wait(), 10)
        except TimeoutError:
            log.warning("identities bucket slow to load; continuing")
        # The servers may have started from an older account JWT: push what we know.
        await self.push_account()
        self._sub = await nc.subscribe(subjects.node_renew("*"), queue=RENEW_QUEUE,
                                       cb=self._on_renew)

    def _mirror(self, key: str, value: bytes | None) -> None:
        bus.mirror(self.identities, lambda b: msgspec.json.decode(b, type=IdentityRecord), key,
                   value)

    def vouches(self, lead: str, name: str) -> bool:
        """Whether the credential of the process led by ``lead`` was enrolled for ``name``
        (and not revoked): what a heartbeat chunk under ``lead``'s key may list."""
        ident = self.identities.get(name)
        return ident is not None and ident.lead == lead and not ident.revoked

    async def stop(self) -> None:
        await end_tasks([self._watch])
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except NATS_ERRORS:
                pass

    # ------------------------------------------------------------------ join tokens

    async def create_token(self, req: w.NewJoinToken, by: str) -> w.JoinToken:
        self._need()
        assert self.join is not None
        if req.name:
            why = w.node_name_problem(req.name)
            if why:
                raise ValidationError(why)
        tid = secrets.token_hex(6)
        token = f"{w.JOIN_PREFIX}{tid}_{secrets.token_urlsafe(32)}"
        now = time.time()
        record = JoinRecord(id=tid, hash=_digest(token), created=now, expires=now + req.expires,
                            uses=1 if req.name else req.uses, labels=req.labels,
                            name=req.name, created_by=by)
        await kv.create(self.join, tid, msgspec.json.encode(record))
        return w.JoinToken(id=tid, token=token, expires=record.expires, uses=record.uses,
                           labels=record.labels, name=record.name)

    async def _spend(self, token: str, names: list[str]) -> JoinRecord:
        """Take ``len(names)`` uses of ``token`` (compare-and-set: two nodes racing for the
        last use cannot both have it), or say clearly why not."""
        assert self.join is not None
        parts = token.split("_", 2) if token.startswith(w.JOIN_PREFIX) else []
        if len(parts) != 3:
            raise ValidationError("that is not a join token (shoal-join_...): make one with "
                                  "shoal token create --join")
        for _ in range(20):
            entry = await kv.get(self.join, parts[1])
            if entry is None:
                raise ValidationError("unknown join token: make a new one with shoal token "
                                      "create --join")
            record = msgspec.json.decode(entry[0], type=JoinRecord)
            if not hmac.compare_digest(record.hash, _digest(token)):
                raise ValidationError("unknown join token: make a new one with shoal token "
                                      "create --join")
            if record.expires < time.time():
                raise ValidationError(f"this join token expired at {_when(record.expires)}: "
                                      "make a new one with shoal token create --join")
            if record.uses < len(names):
                raise ValidationError(
                    "this join token is used up" if record.uses == 0 else
                    f"this join token may enroll {record.uses} more name(s), not {len(names)}")
            if record.name and names != [record.name]:
                raise ValidationError(f"this join token enrolls the node {record.name} only")
            spent = msgspec.structs.replace(record, uses=record.uses - len(names))
            if await kv.update(self.join, record.id, msgspec.json.encode(spent),
                               entry[1]) is not None:
                return record
            # Another enrollment spent a use meanwhile: look again.
        raise Unavailable("the join token is in heavy use; try again")

    # ------------------------------------------------------------------ enrollment

    async def enroll(self, req: w.EnrollRequest) -> w.EnrollReply:
        authority = self._need()
        assert self.ids is not None
        if not req.names or len(req.names) > w.MAX_NAMES or len(set(req.names)) != len(req.names):
            raise ValidationError(f"names: 1 to {w.MAX_NAMES} different node names")
        for name in req.names:
            why = w.node_name_problem(name)
            if why:
                raise ValidationError(why)
        if not (req.public_key.startswith("U") and _is_public_key(req.public_key)):
            raise ValidationError("public_key: the node's user nkey (U...), made by the agent")
        taken = [n for n in req.names if await self._identity(n) is not None]
        if taken:
            raise ConflictError(f"node name(s) already enrolled: {', '.join(taken)}; choose "
                                "another name, or revoke and forget the old node first")
        record = await self._spend(req.token, req.names)
        # Bound into the credential: what the token fixes, never what the node chose (a
        # node may change its own labels at its next start; the token's win over them).
        labels = dict(record.labels)
        now = time.time()
        made: list[str] = []
        for name in req.names:
            ident = IdentityRecord(name=name, lead=req.names[0], names=req.names,
                                   public_key=req.public_key, labels=labels, enrolled=now,
                                   token_id=record.id)
            if await kv.create(self.ids, name, msgspec.json.encode(ident)) is None:
                for taken_now in made:  # another node took one of the names meanwhile
                    await kv.purge(self.ids, taken_now)
                raise ConflictError(f"node name(s) {', '.join(req.names)}: enrolled by "
                                    "another node a moment ago")
            made.append(name)
        jwt = authority.node_jwt(req.public_key, req.names, int(now), self.lifetime, labels)
        log.info("enrolled %s (key %s, join token %s)", ", ".join(req.names),
                 req.public_key[:12], record.id)
        return w.EnrollReply(jwt=jwt, nats_url=self.ctl.cfg.nats.url, names=req.names,
                             labels=labels, expires=now + self.lifetime)

    async def _identity(self, name: str) -> IdentityRecord | None:
        assert self.ids is not None
        entry = await kv.get(self.ids, name)
        return None if entry is None else msgspec.json.decode(entry[0], type=IdentityRecord)

    async def _on_renew(self, msg: Msg) -> None:
        lead = msg.subject.rsplit(".", 1)[-1]
        try:
            reply = await self.renew(lead)
        except Exception as e:
            log.warning("renewing the credential of %s: %s", lead, e)
            reply = w.RenewReply(error=f"the controller could not renew it: {e}")
        try:
            await msg.respond(msgspec.json.encode(reply))
        except NATS_ERRORS as e:
            log.info("renewal answer to %s lost: %s", lead, e)

    async def renew(self, lead: str) -> w.RenewReply:
        authority = self._need()
        ident = await self._identity(lead)
        if ident is None or ident.lead != lead:
            return w.RenewReply(error=f"{lead} is not enrolled (any more): enroll it again "
                                      "with shoal agent --join URL --token T")
        if ident.revoked:
            return w.RenewReply(error=f"{lead} was revoked at {_when(ident.revoked)}")
        jwt = authority.node_jwt(ident.public_key, ident.names, int(time.time()),
                                 self.lifetime, ident.labels)
        return w.RenewReply(jwt=jwt)

    # ------------------------------------------------------------------ revocation

    async def revoke(self, name: str) -> IdentityRecord:
        """Cut ``name`` (and the names its credential serves) off at once."""
        self._need()
        assert self.ids is not None
        if problem := w.node_name_problem(name):  # no valid key either: NATS would refuse it
            raise ValidationError(problem)
        ident = await self._identity(name)
        if ident is None:
            raise NotFoundError(f"no enrolled node named {name!r}")
        if not ident.revoked:
            # The account JWT's revocations count whole seconds: a credential issued in
            # this second is refused too, and a renewal is refused by the record.
            now = float(int(time.time()) + 1)
            for n in ident.names:
                other = await self._identity(n)
                if other is not None and other.public_key == ident.public_key:
                    await self.ids.put(n, msgspec.json.encode(
                        msgspec.structs.replace(other, revoked=now)))
            ident = msgspec.structs.replace(ident, revoked=now)
        await self.push_account()
        # Its heartbeat goes now: the fleet sees it down without waiting out the TTL.
        assert self.ctl.buckets is not None
        heartbeats = self.ctl.buckets.heartbeats
        for key in hostbeat.host_keys(ident.lead, len(ident.names)):
            try:
                await heartbeats.delete(key)
            except NATS_ERRORS as e:
                log.info("removing the heartbeat of revoked %s: %s", ident.lead, e)
        log.warning("revoked the NATS credential of %s (key %s)", ", ".join(ident.names),
                    ident.public_key[:12])
        return ident

    async def revocations(self) -> dict[str, int]:
        assert self.ids is not None
        out: dict[str, int] = {}
        for key in await kv.keys(self.ids):
            ident = await self._identity(key)
            if ident is not None and ident.revoked:
                out[ident.public_key] = max(out.get(ident.public_key, 0), int(ident.revoked))
        return out

    async def push_account(self) -> None:
        """Send the account JWT, revocations included, to every server (through the
        system account, as ``nsc push`` does)."""
        authority = self._need()
        jwt = authority.account_jwt(int(time.time()), await self.revocations())
        creds = RawCredentials(authority.system_creds(int(time.time())))
        sys_nc = await bus.connect(msgspec.structs.replace(self.ctl.cfg.nats, creds=None),
                                   "shoal-controller-system", credentials=creds)
        try:
            reply = await sys_nc.request("$SYS.REQ.CLAIMS.UPDATE", jwt.encode(), timeout=5)
            answer = msgspec.json.decode(reply.data)
            data = answer.get("data", {}) if isinstance(answer, dict) else {}
            if answer.get("error") or data.get("code") != 200:
                raise Unavailable(f"the NATS server refused the account update: "
                                  f"{answer.get('error') or data}")
        finally:
            await bus.close(sys_nc)


def _is_public_key(key: str) -> bool:
    try:
        claims.verify_key(key)
    except (ValueError, binascii.Error):
        return False
    return True


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


# ---------------------------------------------------------------------- operations


async def create_join_token(c: Call, r: w.NewJoinToken) -> w.JoinToken:
    return await c.ctl.enrollment.create_token(r, c.user)


async def enroll_node(c: Call, r: w.EnrollRequest) -> w.EnrollReply:
    return await c.ctl.enrollment.enroll(r)


async def revoke_node(c: Call, r: Named) -> dict[str, Any]:
    ident = await c.ctl.enrollment.revoke(r.name)
    return {"node": ident.name, "names": ident.names, "revoked": ident.revoked}
