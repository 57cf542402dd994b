"""``shoal bridge pycloud``: PyCloud's Redis channels served by the fleet.

The bridge subscribes to PyCloud's request channels and answers each request through shoal's
public HTTP API (``shoal.client.aio.Client``), like any other client: it is not part of the
controller and holds no state of its own.

Exactly one answer per request, however many bridges run: Redis pub/sub hands every message to
every subscriber, so each bridge first claims the request with ``SET <key> <bridge> NX EX <ttl>``
on the same Redis the request came through. The claim is atomic in Redis, needs no second system
(the request's own broker decides), and expires on its own. The bridge that wins answers; the
others drop the message. A bridge that dies between its claim and its answer leaves that one
request unanswered (the client's timeout covers it; a repeated create with the same request id
returns the same session, see ``session_id_for``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING

from ..errors import NotFoundError, ShoalError
from ..logic.sessionstate import LIVE
from ..wire import messages as m
from . import pycloud_protocol as p

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..client.aio import Client

log = logging.getLogger("shoal.bridge.pycloud")

CLAIM_TTL = 600.0  # longer than any bridge takes to see a message it was sent
REQUEST_LABEL = "pycloud-request"  # on every session the bridge makes; status/remove need it
MAX_IN_FLIGHT = 64  # requests served at once; past that the bridge stops reading Redis
DEFAULT_NETWORK = "podman"  # podman's default network: a published port needs one


class Bridge:
    def __init__(self, redis: Redis, client: Client, *, name: str = "",
                 prefix: str = p.DEFAULT_PREFIX, user: str = "agent",
                 selector: m.Labels | None = None, claim_ttl: float = CLAIM_TTL,
                 network: str = DEFAULT_NETWORK) -> None:
        self.redis = redis
        self.client = client
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.prefix = prefix
        self.user = user
        self.selector = dict(selector or {})
        self.claim_ttl = claim_ttl
        self.network = network  # for Docker scripts with a port
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the loop

    async def serve(self, stop: asyncio.Event) -> None:
        """Read requests until ``stop`` is set, reconnecting to Redis when it goes away; then
        finish the requests already claimed."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeout

        channels = p.request_channels(self.prefix)
        backoff = 0.2
        while not stop.is_set():
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(*channels)
                log.info("bridge %s listening on %s", self.name, ", ".join(channels))
                backoff = 0.2
                while not stop.is_set():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
                    if msg is not None and msg.get("type") == "message":
                        await self._slots.acquire()
                        task = asyncio.create_task(self._serve_one(msg["channel"], msg["data"]))
                        self._tasks.add(task)
                        task.add_done_callback(self._done)
            except (RedisConnectionError, RedisTimeout, OSError) as e:
                log.warning("redis: %s; reconnecting in %.1fs", e, backoff)
                try:
                    await asyncio.wait_for(stop.wait(), backoff)
                except TimeoutError:
                    pass
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except (RedisConnectionError, OSError):
                    pass
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=30)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _serve_one(self, channel: bytes | str, data: bytes | str) -> None:
        try:
            await self.handle(_text(channel), data if isinstance(data, bytes) else data.encode())
        except Exception:  # one request must never take the bridge down
            log.exception("pycloud: request on %s failed", _text(channel))

    # ------------------------------------------------------------------ one request

    async def handle(self, channel: str, payload: bytes) -> None:
        verb = p.verb_of(channel, self.prefix)
        if verb is None:
            return
        parsed = p.parse(verb, channel, payload)
        if isinstance(parsed, p.BadRequest):
            if parsed.reply_channel is None:
                log.warning("pycloud %s: %s; no request id in it, so no reply",
                            verb, parsed.message)
                return
            if not await self._claim(channel, parsed.request_id or ""):
                log.debug("pycloud %s %s: answered by another bridge", verb, parsed.request_id)
                return
            await self._publish(parsed.reply_channel, p.Reply(cloud=self.name,
                                                              error=parsed.message))
            log.warning("pycloud %s %s: %s", verb, parsed.request_id, parsed.message)
            return
        rid = parsed.body.id
        if not await self._claim(channel, rid):
            log.debug("pycloud %s %s: answered by another bridge", verb, rid)
            return
        try:
            if isinstance(parsed.body, p.CreateRequest):
                reply = await self._create(parsed.body)
            elif verb == "status":
                reply = await self._status(parsed.body.session)
            else:
                reply = await self._remove(parsed.body.session)
        except ShoalError as e:
            session = parsed.body.session if isinstance(parsed.body, p.SessionRequest) else None
            reply = p.Reply(cloud=self.name, id=session, status=False if session else None,
                            error=e.message)
        except Exception as e:
            log.exception("pycloud %s %s failed", verb, rid)
            reply = p.Reply(cloud=self.name, error=f"internal error in the bridge: {e}")
        await self._publish(parsed.reply_channel, reply)
        if reply.error:
            log.warning("pycloud %s %s: %s", verb, rid, reply.error)
        else:
            log.info("pycloud %s %s: answered (session %s on %s, status %s)", verb, rid,
                     reply.id, reply.cloud, reply.status)

    async def _claim(self, channel: str, rid: str) -> bool:
        key = f"shoal:pycloud:claim:{channel}:{rid}"
        return bool(await self.redis.set(key, self.name, nx=True, px=int(self.claim_ttl * 1000)))

    async def _publish(self, channel: str, reply: p.Reply) -> None:
        await self.redis.publish(channel, p.encode_reply(reply))

    async def _create(self, req: p.CreateRequest) -> p.Reply:
        try:
            container = p.container_script(req.script)
        except ValueError as e:
            return p.Reply(cloud=self.name, error=str(e))
        labels = {REQUEST_LABEL: req.id}
        if container is not None:  # the image's own command; PyCloud's port published
            ports = [container.port] if container.port is not None else []
            spec = m.SessionSpec(id=p.session_id_for(req.id), name="pycloud",
                                 runtime="container", image=container.image,
                                 ports=len(ports), container_ports=ports,
                                 network=self.network if ports else "none",
                                 selector=self.selector, labels=labels)
        else:
            spec = m.SessionSpec(id=p.session_id_for(req.id), name="pycloud", shell=req.script,
                                 user=self.user, selector=self.selector, labels=labels)
        record = await self.client.create_session(spec)
        if record.state == "failed":
            return p.Reply(cloud=record.node or self.name, id=record.id,
                           error=f"session {record.id} failed: {record.reason}")
        return p.Reply(cloud=record.node or self.name, id=record.id)

    async def _record(self, session: str) -> m.SessionRecord | None:
        """The session if it exists and the bridge made it: a Redis publisher sees and ends
        only PyCloud's sessions, never the fleet's others."""
        try:
            record = await self.client.session(session)
        except NotFoundError:
            return None
        return record if REQUEST_LABEL in record.spec.labels else None

    async def _status(self, session: str) -> p.Reply:
        record = await self._record(session)
        if record is None:
            return p.Reply(cloud=self.name, id=session, status=False)
        return p.Reply(cloud=record.node or self.name, id=session, status=record.state in LIVE)

    async def _remove(self, session: str) -> p.Reply:
        record = await self._record(session)
        if record is None:
            return p.Reply(cloud=self.name, id=session, status=False)
        try:
            await self.client.remove(session)
        except NotFoundError:
            pass
        return p.Reply(cloud=record.node or self.name, id=session, status=False)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def redacted(url: str) -> str:
    """The Redis URL without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def run_bridge(client: Client, redis_url: str, *, name: str = "",
                     prefix: str = p.DEFAULT_PREFIX, user: str = "agent",
                     selector: m.Labels | None = None, network: str = DEFAULT_NETWORK,
                     ) -> None:
    """The ``shoal bridge pycloud`` process: serve until SIGTERM or SIGINT."""
    import signal

    from redis.asyncio import Redis

    from ..errors import AuthError, ConfigError, ConnectError

    try:
        redis = Redis.from_url(redis_url, health_check_interval=30)
    except ValueError as e:
        raise ConfigError(f"--redis {redacted(redis_url)!r}: {e}; use redis://HOST:PORT/DB "
                          "(or rediss:// for TLS, unix:///path for a socket)") from e
    try:
        await client.nodes()
    except AuthError:
        raise
    except ConnectError as e:  # the controller may come later; requests get errors meanwhile
        log.warning("%s", e.message)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bridge = Bridge(redis, client, name=name, prefix=prefix, user=user, selector=selector,
                    network=network)
    log.info("bridge %s: PyCloud requests on %s go to the fleet at %s", bridge.name,
             redacted(redis_url), client.url)
    try:
        await bridge.serve(stop)
    finally:
        await redis.aclose()
        log.info("bridge %s stopped", bridge.name)
