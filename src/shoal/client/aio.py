"""The Python client: shoal's HTTP API as async methods (``Client``), with errors from aiohttp
translated to shoal's error tree here and nowhere else.

    async with Client.from_config() as c:
        for node in await c.nodes():
            print(node.name, node.state)
        async with c.run(Targets(all=True), RunSpec(argv=["uname", "-r"])) as run:
            async for event in run:
                ...

Over 400 lines: one method per API operation, plus the reconnecting logs, attach and run
streams; the blocking twin is client/sync.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
import msgspec

from ..config import ClientConfig, load, shoal_home
from ..errors import (
    ConfigError,
    ConnectError,
    ProtocolError,
    RemoteTimeout,
    ShoalError,
    error_for_status,
)
from ..wire import messages as m
from ..wire import servicetypes as st
from ..wire.api import AttachResize
from ..wire.api import Error as ErrorBody
from ..wire.api import LogChunk as LogChunk
from ..wire.api import LogEnd as LogEnd
from ..wire.api import LogEof as LogEof
from ..wire.api import LogError as LogError
from ..wire.api import LogTruncated as LogTruncated
from .endpoints import controller_urls
from .tlsverify import certificate_error, client_context

log = logging.getLogger(__name__)

RECONNECT_FOR = ClientConfig().reconnect_for  # seconds to get a lost controller back
# Errors of an answer in flight that mean "the controller (or its NATS) went away", not "no".
_LOST = (aiohttp.ClientError, TimeoutError, OSError)
_RETRY_STATUS = (502, 503, 504)  # a proxy without a controller behind it, or NATS away

T = TypeVar("T")


class Client:
    """``reconnect_for``: how long ``logs(follow=...)`` and an ``attach`` go on trying to
    reach the controller again after losing it (0: not at all); they resume from the last
    byte they delivered, and log a warning on ``shoal.client.aio`` while they wait. ``url`` may
    list several controllers (comma-separated): a call moves on to the next one while one
    refuses connections."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0,
                 reconnect_for: float = RECONNECT_FOR, ca: str = "") -> None:
        self.urls = controller_urls(url)
        self.url = self.urls[0]
        self.token = token
        self.timeout = timeout
        self.reconnect_for = reconnect_for
        self.ca = ca  # the CA an https:// controller is verified against ("": the system's)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, url: str | None = None, token: str | None = None) -> Client:
        """URL and token from flags, else ``SHOAL_URL``/``SHOAL_TOKEN``, else
        ``$SHOAL_HOME/client.toml`` (which ``shoal up`` writes)."""
        cfg = load(ClientConfig, shoal_home() / "client.toml", {"url": url, "token": token})
        if not 0 <= cfg.reconnect_for <= 86400:
            raise ConfigError(f"reconnect_for must be between 0 and 86400 seconds, not "
                              f"{cfg.reconnect_for:g}")
        return cls(cfg.url, cfg.token, reconnect_for=cfg.reconnect_for, ca=cfg.ca)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                # No pool limit: each attached terminal holds a connection open.
                connector=aiohttp.TCPConnector(family=socket.AF_INET, limit=0,
                                               ssl=client_context(self.ca)),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ plumbing

    async def _connect_any(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        """``attempt(base_url)`` on the current controller, and on the next ones while each
        refuses the connection (nothing was sent, so even a POST is safe to try again).
        The one that answers stays current for the calls after."""
        for i in range(len(self.urls)):
            try:
                return await attempt(self.url)
            except aiohttp.ClientConnectorCertificateError as e:
                # Never "moves on": every controller of a fleet shows the same certificate.
                raise certificate_error(self.url, e) or ConnectError(str(e)) from e
            except aiohttp.ClientConnectorError:
                if i == len(self.urls) - 1:
                    raise
                self.url = self.urls[(self.urls.index(self.url) + 1) % len(self.urls)]
        raise AssertionError("unreachable")

    def _get(self, path: str, params: dict[str, str], base: str,
             ) -> aiohttp.client._RequestContextManager:
        return self.http.get(base + path, params=params)

    async def request(self, method: str, path: str, json: Any = None,
                      params: dict[str, str] | None = None) -> Any:
        """One API call; returns the decoded JSON body, raises a ShoalError on failure."""
        body, _ = await self.request_raw(method, path, json, params)
        try:
            return msgspec.json.decode(body) if body else None
        except msgspec.DecodeError as e:
            raise ProtocolError(f"the controller sent a body that is not JSON: {e}") from e

    async def request_raw(self, method: str, path: str, json: Any = None,
                          params: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
        """One API call; the body as it came, and the response headers."""
        try:
            async with await self._connect_any(lambda base: self.http.request(
                method, base + path, json=json, params=params,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise error_for_status(resp.status, _error_message(resp.status, body),
                                           _retry_after(resp))
                return body, dict(resp.headers)
        except ShoalError:
            raise
        except TimeoutError as e:
            raise RemoteTimeout(f"the controller at {self.url} did not answer in "
                                f"{self.timeout:g}s") from e
        except aiohttp.ClientConnectionError as e:
            raise ConnectError(f"cannot reach the controller at {self.url}: {e}; is `shoal up` "
                               "(or `shoal controller`) running?") from e

    # ------------------------------------------------------------------ nodes

    async def nodes(self, nodes: str = "", state: str = "", q: str = "") -> list[m.NodeInfo]:
        """Every node (or those matching the filters), in natural order of names."""
        return [n async for page in self.node_pages(nodes, state, q) for n in page]

    async def node_pages(self, nodes: str = "", state: str = "", q: str = "",
                         page: int = 2000) -> AsyncIterator[list[m.NodeInfo]]:
        """The nodes a page at a time (a fleet of 100,000 never sits in memory at once)."""
        async for raw, _total in self.node_pages_raw(nodes, state, q, page):
            yield _node_list.decode(raw)

    async def node_pages_raw(self, nodes: str = "", state: str = "", q: str = "",
                             page: int = 2000) -> AsyncIterator[tuple[bytes, int]]:
        """Pages as the JSON arrays the controller sent, each with the count of all matches."""
        params = {k: v for k, v in (("nodes", nodes), ("state", state), ("q", q)) if v}
        after = ""
        while True:
            body, headers = await self.request_raw(
                "GET", "/api/v1/nodes", params={**params, "limit": str(page), "after": after})
            try:
                names = _node_names.decode(body)
                total = int(headers.get("X-Total-Count", "0"))
            except (msgspec.DecodeError, ValueError) as e:
                raise ProtocolError(f"the controller sent a bad node list: {e}") from e
            if names:
                yield body, total
            if len(names) < page:
                return
            after = names[-1].name

    async def fleet(self) -> m.FleetSummary:
        """The nodes counted by state, version, label (``GET /api/v1/fleet``)."""
        body, _ = await self.request_raw("GET", "/api/v1/fleet")
        try:
            return msgspec.json.decode(body, type=m.FleetSummary)
        except msgspec.DecodeError as e:
            raise ProtocolError(f"the controller sent a bad fleet summary: {e}") from e

    async def node(self, name: str) -> m.NodeInfo:
        return msgspec.convert(await self.request("GET", f"/api/v1/nodes/{name}"), m.NodeInfo)

    async def drain(self, node: str, deadline: float | None = None,
                    wait: bool = False) -> dict[str, Any]:
        """Stop new placements on ``node``; at ``deadline`` seconds end what still runs."""
        return await self.request(  # type: ignore[no-any-return]
            "POST", f"/api/v1/nodes/{node}/drain", json={"deadline": deadline, "wait": wait})

    async def undrain(self, node: str) -> None:
        await self.request("POST", f"/api/v1/nodes/{node}/undrain")

    async def forget(self, node: str) -> None:
        """Remove a node that is down (decommissioned) from the registry."""
        await self.request("DELETE", f"/api/v1/nodes/{node}")

    # ------------------------------------------------------------------ tokens, audit

    async def whoami(self) -> dict[str, Any]:
        """The user and scopes of this client's token."""
        return await self.request("GET", "/api/v1/whoami")  # type: ignore[no-any-return]

    async def tokens(self) -> list[dict[str, Any]]:
        return await self.request("GET", "/api/v1/tokens")  # type: ignore[no-any-return]

    async def create_token(self, user: str, scopes: list[str],
                           expires: float | None = None) -> dict[str, Any]:
        """A new token for ``user``; the answer's ``token`` is shown only this once."""
        return await self.request(  # type: ignore[no-any-return]
            "POST", "/api/v1/tokens", json={"user": user, "scopes": scopes, "expires": expires})

    async def revoke_token(self, token_id: str) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            "DELETE", f"/api/v1/tokens/{token_id}")

    async def audit(self, user: str | None = None, since: float | None = None,
                    limit: int = 1000) -> list[dict[str, Any]]:
        params = {"limit": str(limit), **({"user": user} if user else {}),
                  **({"since": repr(since)} if since is not None else {})}
        return await self.request(  # type: ignore[no-any-return]
            "GET", "/api/v1/audit", params=params)

    async def verify_audit(self) -> dict[str, Any]:
        return await self.request("GET", "/api/v1/audit/verify")  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ sessions

    async def create_session(self, spec: m.SessionSpec | dict[str, Any]) -> m.SessionRecord:
        """Create a session (idempotent when the spec has an ``id``); returns its record."""
        body = m.to_builtins(spec) if isinstance(spec, m.SessionSpec) else spec
        return msgspec.convert(await self.request("POST", "/api/v1/sessions", json=body),
                               m.SessionRecord)

    async def sessions(self, state: str | None = None, node: str | None = None,
                       name: str | None = None) -> list[m.SessionRecord]:
        params = {k: v for k, v in (("state", state), ("node", node), ("name", name)) if v}
        data = await self.request("GET", "/api/v1/sessions", params=params)
        return msgspec.convert(data, list[m.SessionRecord])

    async def session(self, session_id: str) -> m.SessionRecord:
        return msgspec.convert(await self.request("GET", f"/api/v1/sessions/{session_id}"),
                               m.SessionRecord)

    async def signal(self, session_id: str, sig: str | int) -> m.SessionRecord:
        data = await self.request("POST", f"/api/v1/sessions/{session_id}/signal",
                                  json={"signal": sig})
        return msgspec.convert(data, m.SessionRecord)

    async def kill(self, session_id: str) -> m.SessionRecord:
        data = await self.request("POST", f"/api/v1/sessions/{session_id}/kill")
        return msgspec.convert(data, m.SessionRecord)

    async def remove(self, session_id: str) -> None:
        await self.request("DELETE", f"/api/v1/sessions/{session_id}")

    async def wait(self, session_id: str, timeout: float = 60.0,
                   poll: float = 0.1) -> m.SessionRecord:
        """Until the session reaches a final state (or ``timeout`` passes)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            record = await self.session(session_id)
            if record.state in ("exited", "failed", "killed", "lost"):
                return record
            if time.monotonic() > deadline:
                raise RemoteTimeout(f"session {session_id} still {record.state} after "
                                    f"{timeout:g}s")
            await asyncio.sleep(poll)

    async def logs(self, session_id: str, start: int = 0, follow: bool = False,
                   tail: int | None = None) -> AsyncIterator[LogEvent]:
        """Output events from byte ``start`` (or the last ``tail`` bytes): ``LogChunk``,
        ``LogTruncated``, then ``LogEnd`` when the session has ended (or ``LogEof`` without
        ``follow``). If the controller goes away meanwhile, it reconnects (for up to
        ``reconnect_for`` seconds) and goes on from the last byte it yielded: no byte is
        yielded twice or skipped."""
        path = f"/api/v1/sessions/{session_id}/logs"
        retry = _Retry(self, f"output of {session_id}")
        position = start  # the offset after the last byte yielded
        started = False  # anything received yet (then resume by offset, not by tail)
        while True:
            if tail is not None and not started:
                params = {"tail": str(tail)}
            else:
                params = {"from": str(position)}
            params["follow"] = "true" if follow else "false"
            try:
                async with await self._connect_any(functools.partial(
                        self._get, path, dict(params))) as resp:
                    if resp.status >= 400:
                        err = error_for_status(resp.status, _error_message(
                            resp.status, await resp.read()), _retry_after(resp))
                        if resp.status not in _RETRY_STATUS or not retry.armed:
                            raise err
                        raise _Lost(err.message, answered=False)
                    retry.connected()
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        event = _log_decoder.decode(line)
                        if isinstance(event, LogError):
                            raise _Lost(event.message, answered=False)
                        started = True
                        if isinstance(event, LogChunk):
                            end = event.offset + len(event.data)
                            if end <= position and event.data:
                                continue  # delivered before a reconnect
                            if event.offset < position:
                                event = LogChunk(event.stream, position,
                                                 event.data[position - event.offset:])
                            position = end
                        elif isinstance(event, LogTruncated):
                            position = max(position, event.end)
                        retry.progress()
                        yield event
                        if isinstance(event, LogEnd | LogEof):
                            return
                    raise _Lost("the controller ended the answer before the output's end")
            except _Lost as e:
                await retry.wait(e.why, position, e.answered)
            except _LOST as e:
                if not retry.armed:
                    raise ConnectError(f"cannot reach the controller at {self.url}: "
                                       f"{_describe(e)}; is `shoal up` (or `shoal controller`)"
                                       " running?") from e
                await retry.wait(_describe(e), position)

    def attach(self, session_id: str, start: int = 0, tail: int | None = None) -> Attachment:
        """Attach to a session's terminal, replaying output from byte ``start`` (or the last
        ``tail`` bytes)."""
        return Attachment(self, session_id, start, tail)

    # ------------------------------------------------------------------ runs

    def run(self, targets: m.Targets, spec: m.RunSpec, *,
            connect_timeout: float = 5.0) -> RunConnection:
        return RunConnection(self, m.RunStart(targets=targets, spec=spec,
                                              connect_timeout=connect_timeout))

    # ------------------------------------------------------------------ services

    async def create_service(self, spec: st.ServiceSpec | dict[str, Any]) -> st.ServiceView:
        """Create a service (the same spec again is a no-op); returns its view."""
        body = m.to_builtins(spec) if isinstance(spec, st.ServiceSpec) else spec
        return msgspec.convert(await self.request("POST", "/api/v1/services", json=body),
                               st.ServiceView)

    async def services(self) -> list[st.ServiceView]:
        return msgspec.convert(await self.request("GET", "/api/v1/services"),
                               list[st.ServiceView])

    async def service(self, name: str) -> st.ServiceView:
        return msgspec.convert(await self.request("GET", f"/api/v1/services/{name}"),
                               st.ServiceView)

    async def scale_service(self, name: str, replicas: int) -> st.ServiceView:
        data = await self.request("POST", f"/api/v1/services/{name}/scale",
                                  json={"replicas": replicas})
        return msgspec.convert(data, st.ServiceView)

    async def drain_service(self, name: str, replica: str | None = None,
                            deadline: float | None = None, wait: bool = False,
                            ) -> st.ServiceView:
        """Stop new clients for one replica (replaced) or the whole service (stopped)."""
        data = await self.request("POST", f"/api/v1/services/{name}/drain",
                                  json={"replica": replica, "deadline": deadline, "wait": wait})
        return msgspec.convert(data, st.ServiceView)

    async def remove_service(self, name: str, deadline: float | None = None) -> None:
        params = {"deadline": str(deadline)} if deadline is not None else None
        await self.request("DELETE", f"/api/v1/services/{name}", params=params)

    async def best(self, name: str) -> st.Best:
        """The replica a new client of ``name`` should use now."""
        return msgspec.convert(await self.request("GET", f"/api/v1/services/{name}/best"),
                               st.Best)


LogEvent = LogChunk | LogTruncated | LogEnd | LogEof | LogError
_log_decoder = msgspec.json.Decoder(LogEvent)


class Attachment:
    """An attached terminal: iterate output bytes and control dicts; send input.

    If the controller goes away, iterating reconnects (for up to the client's
    ``reconnect_for`` seconds) and replays from the last byte it yielded (a new ``hello``
    frame marks the reconnect); input sent meanwhile raises ``ConnectError``. When it cannot
    get back, iterating raises ``ConnectError``: it never just ends without an ``exit``."""

    def __init__(self, client: Client, session_id: str, start: int,
                 tail: int | None = None) -> None:
        self.client = client
        self.session_id = session_id
        self.offset = start
        self.tail = tail
        self.exit: dict[str, Any] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def _connect(self, params: dict[str, str]) -> None:
        path = f"/api/v1/sessions/{self.session_id}/attach"
        try:
            self._ws = await self.client._connect_any(lambda base: self.client.http.ws_connect(
                base + path, params=params, heartbeat=30))
        except aiohttp.WSServerHandshakeError as e:
            raise error_for_status(e.status, f"attach refused: HTTP {e.status} {e.message}",
                                   ) from e
        except _LOST as e:
            raise ConnectError(f"cannot reach the controller at {self.client.url}: "
                               f"{_describe(e)}") from e

    async def __aenter__(self) -> Self:
        await self._connect({"from": str(self.offset)} if self.tail is None
                            else {"tail": str(self.tail)})
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def __aiter__(self) -> AsyncIterator[bytes | dict[str, Any]]:
        assert self._ws is not None
        retry = _Retry(self.client, f"terminal of {self.session_id}")
        retry.connected()
        while True:
            why = "the controller closed the connection"
            answered = True
            try:
                async for msg in self._ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        self.offset += len(msg.data)
                        retry.progress()
                        yield msg.data
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        frame = msgspec.json.decode(msg.data)
                        kind = frame.get("t")
                        if kind == "error":
                            why, answered = str(frame.get("message")), False
                            break
                        if kind == "hello":
                            self.offset = frame["offset"]
                        elif kind == "truncated":
                            self.offset = frame["to"]
                        elif kind == "exit":
                            self.exit = frame
                        yield frame
                        if kind == "exit":
                            return
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        why = _describe(self._ws.exception() or ConnectionError("error"))
            except _LOST as e:
                why = _describe(e)
            await self._ws.close()
            while True:  # the socket is gone without an exit: get it back, or say so
                await retry.wait(why, self.offset, answered)
                try:
                    await self._connect({"from": str(self.offset)})
                    retry.connected()
                    break
                except ShoalError as e:
                    if e.status not in _RETRY_STATUS:
                        raise
                    why, answered = e.message, False

    async def send(self, data: bytes) -> None:
        await self._open().send_bytes(data)

    async def resize(self, cols: int, rows: int) -> None:
        frame = AttachResize(cols=cols, rows=rows)
        await self._open().send_str(msgspec.json.encode(frame).decode())

    def _open(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is None or self._ws.closed:
            raise ConnectError(f"not connected to the controller at {self.client.url} "
                               "(reconnecting); the input was not sent")
        return self._ws


class _Lost(Exception):
    """The answer ended early: the controller (or its NATS) went away. ``answered``: the
    controller was reached and the connection was lost afterwards (not a refusal)."""

    def __init__(self, why: str, answered: bool = True) -> None:
        super().__init__(why)
        self.why = why
        self.answered = answered


class _Retry:
    """Bounded reconnecting for one follower: it gives up ``client.reconnect_for`` seconds
    after the controller stopped answering (a connection that was answered and then lost
    starts the count again; refusals and error frames do not)."""

    def __init__(self, client: Client, what: str) -> None:
        self.client = client
        self.what = what
        self.armed = False  # reconnect only once a first connection worked
        self.attempt = 0
        self.since: float | None = None
        self.fresh = False  # connected, and nothing failed since

    def connected(self) -> None:
        if self.attempt:
            log.info("%s: reconnected to %s", self.what, self.client.url)
        self.armed = True
        self.fresh = True
        self.attempt = 0

    def progress(self) -> None:
        self.since = None

    async def wait(self, why: str, offset: int, answered: bool = True) -> None:
        now = time.monotonic()
        if self.since is None or (answered and self.fresh):
            self.since = now
        self.fresh = False
        budget = self.client.reconnect_for
        if not self.armed or now - self.since >= budget:
            raise ConnectError(f"lost the controller at {self.client.url} ({why}) and could "
                               f"not get it back in {budget:g}s; resume from byte {offset} "
                               "(--from)")
        self.attempt += 1
        if self.attempt == 1 or self.attempt % 5 == 0:
            log.warning("%s: lost the controller at %s (%s); reconnecting to resume at byte "
                        "%d (gives up in %.0fs)", self.what, self.client.url, why, offset,
                        budget - (now - self.since))
        await asyncio.sleep(min(2.0, 0.2 * 2 ** min(self.attempt - 1, 4)))


def _describe(e: BaseException) -> str:
    """A library error as one line, never empty (aiohttp and asyncio errors often are)."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    try:
        return float(resp.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _error_message(status: int, body: bytes) -> str:
    """The message of an error answer (``wire.api.Error``), or what came instead (a proxy's
    page, say)."""
    try:
        return _error_decoder.decode(body).error
    except msgspec.DecodeError:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


_error_decoder = msgspec.json.Decoder(ErrorBody)


class RunConnection:
    """A run over the WebSocket: ``plan`` after entering, then iterate the events."""

    def __init__(self, client: Client, start: m.RunStart) -> None:
        self.client = client
        self.start = start
        self.plan: m.RunPlan | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._stdin_offset = 0

    async def __aenter__(self) -> Self:
        try:
            self._ws = await self.client._connect_any(lambda base: self.client.http.ws_connect(
                base + "/api/v1/run", max_msg_size=16 << 20, heartbeat=30, compress=0))
        except aiohttp.WSServerHandshakeError as e:
            raise error_for_status(e.status, f"run refused: HTTP {e.status} {e.message}") from e
        except aiohttp.ClientConnectionError as e:
            raise ConnectError(f"cannot reach the controller at {self.client.url}: {e}; is "
                               "`shoal up` (or `shoal controller`) running?") from e
        await self._ws.send_bytes(m.pack(self.start))
        first = await self._next()
        if isinstance(first, m.ErrorFrame):
            await self._ws.close()
            raise error_for_status(first.status, first.message)
        if not isinstance(first, m.RunPlan):
            raise ProtocolError(f"expected a run plan, got {type(first).__name__}")
        self.plan = first
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def _next(self) -> m.ServerFrame | None:
        assert self._ws is not None
        msg = await self._ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            try:
                return m.unpack_server_frame(msg.data)
            except msgspec.DecodeError as e:
                raise ProtocolError(f"undecodable frame from the controller: {e}") from e
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                        aiohttp.WSMsgType.CLOSED):
            return None
        if msg.type == aiohttp.WSMsgType.ERROR:
            raise ConnectError(f"connection to the controller failed: {self._ws.exception()}")
        return await self._next()

    def __aiter__(self) -> AsyncIterator[m.ServerFrame]:
        return self._events()

    async def _events(self) -> AsyncIterator[m.ServerFrame]:
        while True:
            frame = await self._next()
            if frame is None:
                raise ConnectError("the controller closed the connection before the run ended")
            if isinstance(frame, m.RunDone):
                return
            if isinstance(frame, m.ErrorFrame):
                raise error_for_status(frame.status, frame.message)
            if isinstance(frame, m.RunEvents):  # several in one frame: one at a time here
                for ev in frame.events:
                    yield ev
            else:
                yield frame

    async def _send(self, frame: m.ClientFrame) -> None:
        assert self._ws is not None
        if not self._ws.closed:
            await self._ws.send_bytes(m.pack(frame))

    async def send_stdin(self, data: bytes, eof: bool = False) -> None:
        await self._send(m.StdinData(offset=self._stdin_offset, data=data, eof=eof))
        self._stdin_offset += len(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._send(m.Resize(cols=cols, rows=rows))

    async def signal(self, signum: int) -> None:
        await self._send(m.SignalRun(signum=signum))

    async def cancel(self) -> None:
        await self._send(m.Cancel())


class _Named(msgspec.Struct):
    name: str


_node_list = msgspec.json.Decoder(list[m.NodeInfo])
_node_names = msgspec.json.Decoder(list[_Named])  # just enough to page on
