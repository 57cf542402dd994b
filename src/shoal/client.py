"""The Python client: shoal's HTTP API as async methods (``Client``), with errors from aiohttp
translated to shoal's error tree here and nowhere else.

    async with Client.from_config() as c:
        for node in await c.nodes():
            print(node.name, node.state)
        async with c.run(Targets(all=True), RunSpec(argv=["uname", "-r"])) as run:
            async for event in run:
                ...
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self

import aiohttp
import msgspec

from . import messages as m
from . import servicetypes as st
from .config import ClientConfig, load, shoal_home
from .errors import ConnectError, ProtocolError, RemoteTimeout, ShoalError, error_for_status


class Client:
    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_config(cls, url: str | None = None, token: str | None = None) -> Client:
        """URL and token from flags, else ``SHOAL_URL``/``SHOAL_TOKEN``, else
        ``$SHOAL_HOME/client.toml`` (which ``shoal up`` writes)."""
        cfg = load(ClientConfig, shoal_home() / "client.toml", {"url": url, "token": token})
        return cls(cfg.url, cfg.token)

    @property
    def http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
                # No pool limit: each attached terminal holds a connection open.
                connector=aiohttp.TCPConnector(family=socket.AF_INET, limit=0),
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
            async with self.http.request(
                method, self.url + path, json=json, params=params,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise error_for_status(resp.status, _error_message(resp.status, body))
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
        ``follow``)."""
        params = {"from": str(start), "follow": "true" if follow else "false"}
        if tail is not None:
            params = {"tail": str(tail), "follow": params["follow"]}
        url = f"{self.url}/api/v1/sessions/{session_id}/logs"
        try:
            async with self.http.get(url, params=params) as resp:
                if resp.status >= 400:
                    raise error_for_status(resp.status, _error_message(resp.status,
                                                                       await resp.read()))
                async for line in resp.content:
                    if line.strip():
                        event = _log_decoder.decode(line)
                        if isinstance(event, LogError):
                            raise ShoalError(f"{event.message}; resume from {event.offset}")
                        yield event
        except aiohttp.ClientConnectionError as e:
            raise ConnectError(f"lost the controller at {self.url}: {e}") from e

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


class LogChunk(msgspec.Struct, tag="out", tag_field="t"):
    stream: str
    offset: int
    data: bytes


class LogTruncated(msgspec.Struct, tag="truncated", tag_field="t", rename={"start": "from",
                                                                              "end": "to"}):
    start: int
    end: int


class LogEnd(msgspec.Struct, tag="end", tag_field="t"):
    offset: int
    state: str
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""


class LogEof(msgspec.Struct, tag="eof", tag_field="t"):
    offset: int


class LogError(msgspec.Struct, tag="error", tag_field="t"):
    """The controller could not read on (the output stream failed); resume from ``offset``."""

    offset: int
    message: str


LogEvent = LogChunk | LogTruncated | LogEnd | LogEof | LogError
_log_decoder = msgspec.json.Decoder(LogEvent)


class Attachment:
    """An attached terminal: iterate output bytes and control dicts; send input."""

    def __init__(self, client: Client, session_id: str, start: int,
                 tail: int | None = None) -> None:
        self.client = client
        self.session_id = session_id
        self.offset = start
        self.tail = tail
        self.exit: dict[str, Any] | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None

    async def __aenter__(self) -> Self:
        url = f"{self.client.url}/api/v1/sessions/{self.session_id}/attach"
        try:
            params = {"from": str(self.offset)} if self.tail is None else {"tail": str(self.tail)}
            self._ws = await self.client.http.ws_connect(url, params=params,
                                                            heartbeat=30)
        except aiohttp.WSServerHandshakeError as e:
            raise error_for_status(e.status, f"attach refused: HTTP {e.status} {e.message}") from e
        except aiohttp.ClientConnectionError as e:
            raise ConnectError(f"cannot reach the controller at {self.client.url}: {e}") from e
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def __aiter__(self) -> AsyncIterator[bytes | dict[str, Any]]:
        assert self._ws is not None
        async for msg in self._ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.offset += len(msg.data)
                yield msg.data
            elif msg.type == aiohttp.WSMsgType.TEXT:
                frame = msgspec.json.decode(msg.data)
                if frame.get("t") == "hello":
                    self.offset = frame["offset"]
                elif frame.get("t") == "truncated":
                    self.offset = frame["to"]
                elif frame.get("t") == "exit":
                    self.exit = frame
                yield frame
                if frame.get("t") in ("exit", "error"):
                    return

    async def send(self, data: bytes) -> None:
        assert self._ws is not None
        await self._ws.send_bytes(data)

    async def resize(self, cols: int, rows: int) -> None:
        assert self._ws is not None
        await self._ws.send_str(msgspec.json.encode({"t": "resize", "cols": cols,
                                                     "rows": rows}).decode())


def _error_message(status: int, body: bytes) -> str:
    try:
        data = msgspec.json.decode(body)
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return str(data["error"])
    except msgspec.DecodeError:
        pass
    return f"HTTP {status}: {body[:200].decode(errors='replace')}"


class RunConnection:
    """A run over the WebSocket: ``plan`` after entering, then iterate the events."""

    def __init__(self, client: Client, start: m.RunStart) -> None:
        self.client = client
        self.start = start
        self.plan: m.RunPlan | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._stdin_offset = 0

    async def __aenter__(self) -> Self:
        url = self.client.url + "/api/v1/run"
        try:
            self._ws = await self.client.http.ws_connect(url, max_msg_size=16 << 20,
                                                            heartbeat=30, compress=0)
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
