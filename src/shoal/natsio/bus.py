"""The NATS boundary: connecting (with nats-py errors translated to shoal's) and the
JetStream buckets shoal keeps its state in.

Over 400 lines: every bucket and every NATS error translation in one place, so that no
other module needs to know nats-py's error types.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
import nats.aio.client
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from ..config import NatsConfig
from ..errors import AuthError, ConfigError, ConnectError
from ..wire.servicetypes import SERVICES_BUCKET
from ..wire.subjects import HEARTBEATS_BUCKET, REGISTRY_BUCKET, SESSIONS_BUCKET

log = logging.getLogger(__name__)

# nats-py reads its socket DEFAULT_BUFFER_SIZE (32 KiB) at a time, a module constant read on
# every read; run output comes in messages of up to 1 MiB, so read in bigger steps
# (measured: a fifth less CPU in the controller and in nats-server per GiB of output).
READ_BUFFER = 1 << 20

__all__ = ["NATS_ERRORS", "Buckets", "NatsClient", "NodeBuckets", "close", "connect",
           "ensure_buckets", "open_buckets", "open_node_buckets"]

# What a NATS call can raise when the server is away, restarting or slow: nats-py's own
# errors (JetStream's included), and the bare TimeoutError (asyncio's, in 3.11 the builtin)
# that nats-py 2.16 lets out of fetch and request deadlines. Callers catch this tuple.
NATS_ERRORS: tuple[type[BaseException], ...] = (nats.errors.Error, TimeoutError, OSError)


AGENT_INBOX = "_INBOX_AGENT"


async def connect(cfg: NatsConfig, name: str, *, connect_timeout: float = 5.0,
                  inbox_prefix: str = "_INBOX", credentials: object = None,
                  on_refused: Callable[[str], None] | None = None) -> NatsClient:
    """Connect to NATS, failing fast and clearly on refused credentials or no server.
    ``credentials``: a .creds text (nats-py's RawCredentials) instead of ``cfg``'s. Once
    connected, a server that ends the connection over its credential (revoked, expired)
    makes nats-py close the client for good; ``on_refused`` then gets a sentence that says
    so and what to do."""
    last_error: list[BaseException] = []

    async def on_error(e: Exception) -> None:
        last_error.append(e)
        if _is_auth(e):
            return  # reported once, by the exception below (or on_closed)
        log.warning("nats: %s", e)

    client: list[NatsClient] = []  # set once connected: the callbacks ask it where it is

    async def on_disconnect() -> None:
        if client and (client[0].is_closed or client[0].is_draining):
            return  # our own close, not an outage
        log.warning("nats: disconnected from %s; reconnecting", _safe_url(cfg.url))

    async def on_closed() -> None:
        err = client[0].last_error if client else None
        if on_refused is not None and err is not None and (_is_auth(err) or _is_refused(err)):
            on_refused(_refusal(err, cfg))

    async def on_reconnect() -> None:
        where = client[0].connected_url if client else None
        log.info("nats: reconnected%s", f" to {where.netloc.rpartition('@')[2]}" if where else "")

    opts: dict[str, Any] = {
        "servers": [u.strip() for u in cfg.url.split(",") if u.strip()],
        "dont_randomize": not cfg.randomize,
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "closed_cb": on_closed,
        "pending_size": 64 << 20,
        "inbox_prefix": inbox_prefix,
        "flusher_queue_size": 4096,
    }
    if cfg.user:
        opts["user"] = cfg.user
        opts["password"] = cfg.password or ""
    if cfg.creds:
        opts["user_credentials"] = cfg.creds
    if credentials is not None:
        opts["user_credentials"] = credentials
    tls = tls_context(cfg)
    if tls is not None:
        opts["tls"] = tls
        if cfg.tls_hostname:
            opts["tls_hostname"] = cfg.tls_hostname
    try:
        # Reconnects are for later outages; the first connect must say no at once.
        opts["max_reconnect_attempts"] = 0
        opts["allow_reconnect"] = False
        nats.aio.client.DEFAULT_BUFFER_SIZE = max(nats.aio.client.DEFAULT_BUFFER_SIZE, READ_BUFFER)
        nc = await nats.connect(**opts)
    except Exception as e:  # nats-py raises a zoo of types here; translate them all
        errs = [*last_error, e]
        bad_cert = next((x for x in errs if isinstance(x, ssl.SSLCertVerificationError)), None)
        if bad_cert is not None:
            raise ConnectError(
                f"NATS at {_safe_url(cfg.url)}: certificate verify failed: "
                f"{bad_cert.verify_message or bad_cert}; set [nats] ca (SHOAL_NATS_CA) to the "
                "CA that signed the server's certificate") from e
        if any(_is_auth(x) for x in errs):
            raise AuthError(
                f"NATS at {_safe_url(cfg.url)} refused the credentials "
                f"(user {cfg.user or '-'}): check the password or .creds file in the config"
            ) from e
        hint = "is nats-server running (shoal up starts one) and is the URL right?"
        if tls is not None and not cfg.cert:
            hint += (" A server that verifies client certificates (mutual TLS) drops a client"
                     " without one: set [nats] cert and key")
        raise ConnectError(
            f"cannot connect to NATS at {_safe_url(cfg.url)}: {errs[0]}; {hint}") from e
    client.append(nc)
    _tolerate_late_pongs(nc)
    # Now that we are in, keep trying forever through outages.
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _tolerate_late_pongs(nc: NatsClient) -> None:
    """nats-py 2.16 leaves a timed-out ``flush()``'s cancelled future in its queue of PONG
    waiters; the late PONG (a partition healed) then raises InvalidStateError in the read
    loop, which stops for good while the client still says connected: deaf, never
    reconnecting (tests/faults/test_fault_nats.py). The PONG answers that flush: drop it."""
    async def process_pong() -> None:
        if nc._pongs:  # noqa: SLF001 - nats-py's own bookkeeping, as its method does it
            future = nc._pongs.pop(0)  # noqa: SLF001
            if not future.done():
                future.set_result(True)
            nc._pongs_received += 1  # noqa: SLF001
            nc._pings_outstanding = 0  # noqa: SLF001

    nc._process_pong = process_pong  # type: ignore[method-assign]  # noqa: SLF001


def tls_context(cfg: NatsConfig) -> ssl.SSLContext | None:
    """The TLS settings of ``cfg`` (None: plain TCP): the server verified against ``ca`` (else
    the system's CAs), and our client certificate when the server asks for one (mutual TLS)."""
    if not (cfg.ca or cfg.cert or cfg.url.startswith("tls://")):
        return None
    _quiet_asyncio_tls()
    if bool(cfg.cert) != bool(cfg.key):
        raise ConfigError("[nats] cert and key go together: give both (the client certificate "
                          "and its private key) or neither")
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca or None)
        if cfg.cert and cfg.key:
            ctx.load_cert_chain(cfg.cert, cfg.key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the NATS TLS files (ca {cfg.ca or '-'}, cert "
                          f"{cfg.cert or '-'}, key {cfg.key or '-'}): {e}") from e
    return ctx


def _drop_eof_notice(record: logging.LogRecord) -> bool:
    # nats-py's protocol returns True from eof_received, which asyncio ignores under TLS and
    # then logs at WARNING on every connection: noise, nothing an operator can act on.
    return "eof_received() has no effect when using ssl" not in record.getMessage()


def _quiet_asyncio_tls() -> None:
    logger = logging.getLogger("asyncio")
    if _drop_eof_notice not in logger.filters:
        logger.addFilter(_drop_eof_notice)


async def close(nc: NatsClient, timeout: float = 5.0) -> None:
    """Flush and close; bounded, so a dead server cannot hold up a shutdown."""
    if nc.is_closed:
        return
    try:
        await asyncio.wait_for(nc.drain(), timeout)
    except Exception:
        pass
    if not nc.is_closed:
        try:
            await nc.close()
        except Exception as e:  # the server went first: nothing left to flush
            log.debug("closing NATS: %s", e)


def _is_auth(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, nats.errors.AuthorizationError) or "authorization" in text


def _is_refused(e: BaseException) -> bool:
    # What nats-server says when it ends a connection over its JWT.
    text = str(e).lower()
    return "authentication expired" in text or "authentication revoked" in text


def _refusal(e: BaseException, cfg: NatsConfig) -> str:
    text = str(e)
    if "expired" in text.lower():
        why = "its credential expired (it was not renewed in time)"
    elif "revoked" in text.lower():
        why = "its credential was revoked (shoal nodes revoke)"
    else:
        why = "it refuses the credential (revoked, expired, or not one it trusts)"
    where = f"the .creds file {cfg.creds}" if cfg.creds else "the configured credentials"
    return (f"NATS at {_safe_url(cfg.url)} closed this agent's connection: {why} ({text}); "
            f"not reconnecting with {where}: enroll again with shoal agent --join URL "
            "--token T (a new token from shoal token create --join)")


def _safe_url(url: str) -> str:
    # Never echo a password embedded in a URL.
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# What a JetStream call raises while its stream has no leader (one was lost and the rest are
# electing another, a few seconds on a cluster) or while the connection fails over.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError, nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError)
ELECTION_PATIENCE = 20.0  # seconds: NATS elects a new stream leader well within this

T = TypeVar("T")


async def through_elections(op: Callable[[], Awaitable[T]], what: str,
                            patience: float = ELECTION_PATIENCE) -> T:
    """``op()``, tried again while it fails transiently (see TRANSIENT), for up to
    ``patience`` seconds; then its last error. ``op`` must be safe to repeat: callers
    pass compare-and-set writes, whose repeat is refused rather than applied twice."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    pause = 0.1
    while True:
        try:
            return await op()
        except TRANSIENT as e:
            if loop.time() + pause > deadline:
                raise
            log.info("%s: %s; trying again", what, e or type(e).__name__)
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)


Apply = Callable[[str, bytes | None], None]


def client_of(kv: KeyValue) -> NatsClient:
    """The connection a bucket handle uses (nats-py keeps it private)."""
    return kv._js._nc  # noqa: SLF001


async def watch_bucket(kv: KeyValue, apply: Apply, ready: Callable[[], None] | None = None,
                       what: str = "bucket") -> None:
    """Feed every current and future entry of ``kv`` to ``apply(key, value)`` forever
    (``value`` None for a delete or purge). ``ready`` is called once the current values are
    in, and again after every re-watch.

    The watch is armed again as soon as the connection comes back from an outage (nats-py's
    ordered consumer would take its own ~10 s to notice), and the re-watch replays the
    current values: keys that went away meanwhile are applied as deletions, so a mirror of
    the bucket is exact again once ``ready`` is called.
    """
    nc = client_of(kv)  # its reconnect count tells us when to watch again
    known: set[str] = set()  # keys with a value, as last applied

    async def consume(watcher: KeyValue.KeyWatcher) -> None:
        replayed: set[str] | None = set()  # keys seen before the current values were in
        async for entry in watcher:
            if entry is None:  # the current values are in
                if replayed is not None:
                    for gone in known - replayed:
                        known.discard(gone)
                        apply(gone, None)
                    replayed = None
                if ready is not None:
                    ready()
                continue
            put = entry.operation in (None, "PUT") and bool(entry.value)
            if put:
                known.add(entry.key)
                if replayed is not None:
                    replayed.add(entry.key)
            else:
                known.discard(entry.key)
            apply(entry.key, entry.value if put else None)

    while True:
        reconnects = nc.stats["reconnects"]
        watcher = None
        reader: asyncio.Task[None] | None = None
        try:
            watcher = await kv.watchall()
            reader = asyncio.create_task(consume(watcher))
            while not reader.done() and nc.stats["reconnects"] == reconnects:
                await asyncio.wait({reader}, timeout=0.5)
            if reader.done():
                reader.result()  # its error, if any
            else:
                log.info("%s watch: NATS reconnected; watching again", what)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("%s watch failed (%s); retrying", what, str(e) or type(e).__name__)
            await asyncio.sleep(0.5)
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            if watcher is not None:
                try:
                    await watcher.stop()  # type: ignore[no-untyped-call]
                except Exception:  # the old subscription may be gone with the connection
                    pass


R = TypeVar("R")


def mirror(records: dict[str, R], decode: Callable[[bytes], R], key: str,
           value: bytes | None) -> bool:
    """Apply one bucket entry (as ``watch_bucket`` gives it) to a dict that mirrors the
    bucket; False, changing nothing, if the value does not decode."""
    if value is None:
        records.pop(key, None)
        return True
    try:
        records[key] = decode(value)
    except msgspec.DecodeError:
        return False
    return True


class NodeBuckets:
    """The buckets an agent binds: its heartbeats and registry entries (never the session
    records: the controllers own them, and a node's credential cannot read them)."""

    def __init__(self, js: JetStreamContext, heartbeats: KeyValue, registry: KeyValue) -> None:
        self.js = js
        self.heartbeats = heartbeats
        self.registry = registry


class Buckets(NodeBuckets):
    """The key-value buckets, bound."""

    def __init__(self, js: JetStreamContext, heartbeats: KeyValue, registry: KeyValue,
                 sessions: KeyValue) -> None:
        super().__init__(js, heartbeats, registry)
        self.sessions = sessions
        self.services: KeyValue | None = None  # set by ensure_buckets


NO_PEERS = 10005  # JetStream's "no suitable peers for placement"
CLUSTER_FORMING = 30.0  # seconds a fresh cluster may take until every peer can host


async def ensure_buckets(nc: NatsClient, node_ttl: float, replicas: int = 1,
                         terminal_output_bytes: int = 1 << 30) -> Buckets:
    """Create the buckets if missing (controllers do this; it is idempotent). ``replicas``
    is how many servers of a NATS cluster keep each of them. On a cluster that is still
    forming (its meta leader has not heard from enough peers yet) it tries again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CLUSTER_FORMING
    while True:
        try:
            return await _ensure_buckets(nc, node_ttl, replicas, terminal_output_bytes)
        except Exception as e:
            if isinstance(e, nats.js.errors.APIError) and e.err_code == STORE_FULL:
                raise ConnectError(await _store_full_message(nc, e)) from None
            forming = isinstance(e, TRANSIENT) or (
                isinstance(e, nats.js.errors.BadRequestError) and e.err_code == NO_PEERS)
            if not forming or loop.time() > deadline:
                raise
            log.info("JetStream cannot place %d replicas yet (%s); waiting", replicas, e)
            await asyncio.sleep(0.5)


STORE_FULL = 10047  # JetStream: insufficient storage resources


async def _store_full_message(nc: NatsClient, e: BaseException) -> str:
    """Why the streams cannot be made, with what the store has left, and what to do."""
    free = "an unknown number of"
    try:
        info = await nc.jetstream().account_info()
        if info.limits.max_storage and info.limits.max_storage > 0:
            free = str(max(0, info.limits.max_storage - info.storage))
    except Exception:  # the message matters more than the figure
        pass
    return (f"the JetStream store is full: {free} bytes free ({e}). The output stream "
            "reserves its byte limit up front: give nats-server a store_dir on a larger "
            "filesystem (or its max_file_store more room), or free space there, then start "
            "the controller again")


async def _ensure_buckets(nc: NatsClient, node_ttl: float, replicas: int,
                          terminal_output_bytes: int) -> Buckets:
    from .outputlog import ensure_stream  # outputlog uses this module's error tuple

    js = nc.jetstream()

    def kv(bucket: str, ttl: float | None = None) -> KeyValueConfig:
        # File storage: a restarted NATS server still has the buckets and the latest beats.
        return KeyValueConfig(bucket=bucket, ttl=ttl, history=1, storage=StorageType.FILE,
                              replicas=replicas)

    hb = await _ensure_kv(js, kv(HEARTBEATS_BUCKET, node_ttl))
    reg = await _ensure_kv(js, kv(REGISTRY_BUCKET))
    sessions = await _ensure_kv(js, kv(SESSIONS_BUCKET))
    await ensure_stream(js, replicas=replicas, terminal_bytes=terminal_output_bytes)
    buckets = Buckets(js, hb, reg, sessions)
    # Service records (controllers only; agents never open it).
    buckets.services = await _ensure_kv(js, kv(SERVICES_BUCKET))
    return buckets


async def _ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(config=config)


async def open_buckets(nc: NatsClient) -> Buckets:
    """Bind existing buckets, the session records too (controllers' tools and tests)."""
    js = nc.jetstream()
    try:
        return Buckets(js, await js.key_value(HEARTBEATS_BUCKET),
                       await js.key_value(REGISTRY_BUCKET), await js.key_value(SESSIONS_BUCKET))
    except nats.js.errors.BucketNotFoundError as e:
        raise ConnectError("the shoal buckets do not exist yet: start a controller first") from e


async def open_node_buckets(nc: NatsClient) -> NodeBuckets:
    """Bind the buckets an agent writes (its credential cannot create streams)."""
    js = nc.jetstream()
    try:
        return NodeBuckets(js, await js.key_value(HEARTBEATS_BUCKET),
                           await js.key_value(REGISTRY_BUCKET))
    except nats.js.errors.BucketNotFoundError as e:
        raise ConnectError("the shoal buckets do not exist yet: start a controller first") from e
