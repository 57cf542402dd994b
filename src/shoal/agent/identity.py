"""This agent's own NATS identity: enrollment with a join token, and renewal.

Enrollment (``shoal agent --join URL --token T``, or ``join_url``/``join_token`` in
agent.toml): the agent makes its nkey here, sends only the public key with the token and its
names to the controller, and keeps the user JWT it gets back with its seed in a standard
``.creds`` file, 0600, under its state directory (``identity/<lead>.creds``). The private key
never leaves this machine. Later starts reuse the file.

Renewal: a credential expires (``node_credential_lifetime`` on the controllers, a day by
default). At two thirds of its life the agent asks on ``shoal.identity.renew.<lead>``, writes
the new JWT into the file and reconnects at once with it (nats-py reads the file on every
connect); a refused renewal is logged as an error each time it is tried. If the
credential expires or is revoked all the same, the server ends the connection and the agent
stops with a message that says so (bus.connect's ``on_refused``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import msgspec

from ..config import AgentConfig, write_secret_file
from ..errors import ConfigError, ConnectError
from ..identity import claims
from ..identity.authority import LABEL_TAG, NODE_TAG
from ..wire import enrollment as w
from ..wire import subjects

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

log = logging.getLogger(__name__)

RENEW_AT = 2 / 3  # of the credential's lifetime
RENEW_RETRY = 30.0  # seconds between tries of a renewal that failed
ENROLL_TIMEOUT = 30.0


def creds_path(cfg: AgentConfig, state_dir: Path, lead: str) -> Path:
    return Path(cfg.nats.creds) if cfg.nats.creds else state_dir / "identity" / f"{lead}.creds"


def uses_identity(cfg: AgentConfig, state_dir: Path, lead: str) -> bool:
    """Whether this agent connects with a node credential of its own."""
    return bool(cfg.join_url or cfg.nats.creds or creds_path(cfg, state_dir, lead).exists())


async def ensure(cfg: AgentConfig, state_dir: Path, names: list[str]) -> AgentConfig:
    """``cfg`` with [nats] creds pointing at this agent's own credential: the one it has,
    else one it enrolls for now. Labels the credential fixes replace configured ones."""
    path = creds_path(cfg, state_dir, names[0])
    if not path.exists():
        if not (cfg.join_url and cfg.join_token):
            raise ConfigError(f"no NATS credential at {path}: enroll this node with shoal agent "
                              "--join URL --token T (shoal token create --join makes T)")
        if len(names) > w.MAX_NAMES:
            raise ConfigError(
                f"one node credential names at most {w.MAX_NAMES} nodes, not {len(names)}: run "
                f"several agents of --virtual {w.MAX_NAMES} or fewer (each its own --prefix), "
                "or, for a large virtual fleet in one process, a fleet with the shared agent "
                "user (shoal up --shared-agent-user, docs/operations.md)")
        reply = await enroll(cfg, names, path)
        log.info("enrolled %s with %s; credential in %s (expires %s)", ", ".join(names),
                 cfg.join_url, path, time.strftime("%Y-%m-%d %H:%M UTC",
                                                   time.gmtime(reply.expires)))
    jwt = claims.parse_creds(path.read_text(), str(path)).jwt
    found = claims.decode(jwt)
    expired = int(found.get("exp", 0))
    if expired and expired <= time.time():
        raise ConfigError(f"the NATS credential in {path} expired at "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expired))} (the "
                          "agent was not running to renew it): revoke the old name with shoal "
                          "nodes revoke, and enroll again with shoal agent --join URL --token T")
    tags = [t for t in found.get("nats", {}).get("tags", []) if isinstance(t, str)]
    bound = [t[len(NODE_TAG):] for t in tags if t.startswith(NODE_TAG)]
    if bound and bound != names:
        raise ConfigError(f"the credential {path} is for {', '.join(bound)}, not "
                          f"{', '.join(names)}: a node cannot take another name (enroll the "
                          "new name with a join token)")
    labels = dict(t[len(LABEL_TAG):].partition("=")[::2] for t in tags
                  if t.startswith(LABEL_TAG))
    nats = msgspec.structs.replace(cfg.nats, creds=str(path), user=None, password=None)
    return msgspec.structs.replace(cfg, nats=nats, labels={**cfg.labels, **labels})


async def enroll(cfg: AgentConfig, names: list[str], path: Path) -> w.EnrollReply:
    seed = claims.new_seed("user")
    req = w.EnrollRequest(token=cfg.join_token, public_key=claims.public_key(seed),
                          names=names, labels=cfg.labels)
    url = cfg.join_url.rstrip("/") + "/api/v1/enroll"
    ctx: ssl.SSLContext | bool = True
    if cfg.join_ca:
        ctx = ssl.create_default_context(cafile=cfg.join_ca)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ENROLL_TIMEOUT)) \
                as http, http.post(url, data=msgspec.json.encode(req), ssl=ctx,
                                   headers={"Content-Type": "application/json"}) as resp:
            data = await resp.read()
            if resp.status != 201:
                raise ConfigError(f"enrolling {', '.join(names)} at {cfg.join_url} was refused "
                                  f"({resp.status}): {_message(data)}")
    except aiohttp.ClientError as e:
        raise ConnectError(f"cannot reach the controller at {cfg.join_url} to enroll: {e}") \
            from e
    reply = msgspec.json.decode(data, type=w.EnrollReply)
    write_secret_file(path, claims.creds(reply.jwt, seed))
    return reply


def _message(data: bytes) -> str:
    try:
        found = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data[:200].decode(errors="replace")
    if isinstance(found, dict) and isinstance(found.get("error"), str):
        return str(found["error"])
    return str(found)[:200]


async def renew_forever(nc: NatsClient, path: Path, lead: str) -> None:
    """Renew the credential in ``path`` before it expires, for as long as we run."""
    while True:
        jwt = claims.parse_creds(path.read_text(), str(path)).jwt
        found = claims.decode(jwt)
        issued, expires = int(found.get("iat", 0)), int(found.get("exp", 0))
        if not expires:
            return  # a credential without an end needs no renewal
        when = issued + (expires - issued) * RENEW_AT
        await asyncio.sleep(max(0.0, when - time.time()))
        while True:
            error = await _renew_once(nc, path, lead)
            if not error:
                break
            left = expires - time.time()
            log.error("cannot renew the NATS credential of %s (%s); it expires in %.0fs, and "
                      "then this agent stops", lead, error, max(0.0, left))
            await asyncio.sleep(min(RENEW_RETRY, max(1.0, left / 4)))


async def _renew_once(nc: NatsClient, path: Path, lead: str) -> str:
    try:
        msg = await nc.request(subjects.node_renew(lead), b"", timeout=10)
        reply = msgspec.json.decode(msg.data, type=w.RenewReply)
    except Exception as e:  # no controller answering, NATS away, a bad answer
        return f"no answer: {e!r}"
    if reply.error or not reply.jwt:
        return reply.error or "an empty answer"
    seed = claims.parse_creds(path.read_text(), str(path)).seed
    write_secret_file(path, claims.creds(reply.jwt, seed))
    log.info("renewed the NATS credential of %s; reconnecting with it", lead)
    # The server ends a connection when the JWT it was opened with expires: reopen now.
    await nc.force_reconnect()
    return ""
