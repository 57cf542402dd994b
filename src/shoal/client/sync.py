"""``SyncClient``: the async ``Client`` for code that is not async.

    with SyncClient.from_config() as c:
        record = c.create_session(SessionSpec(command=["uname", "-a"]))
        c.wait(record.id)
        for event in c.logs(record.id):
            ...

Each ``SyncClient`` owns an event loop in a daemon thread, and every method hands the
matching ``Client`` coroutine to that loop and blocks until it finishes. Nothing is
reimplemented: methods are generated from ``Client``'s (same names, signatures and
docstrings), iterators pull one item per call, and ``run``/``attach`` return blocking
context managers over the async ones. One loop for the client's whole life means one HTTP
connection pool and iterators that can be paused, and it works from any thread, including
one that already runs an event loop (a notebook).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, cast

from ..wire import messages as m
from .aio import RECONNECT_FOR, Attachment, Client, RunConnection

P = ParamSpec("P")
R = TypeVar("R")

CANCEL_WAIT = 10.0  # seconds an interrupted call may take to unwind (it is cancelled)


class _Portal:
    """An event loop running in a daemon thread; runs awaitables for other threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="shoal-sync",
                                        daemon=True)
        self._thread.start()

    def call(self, awaitable: Awaitable[R]) -> R:
        if threading.current_thread() is self._thread:
            raise RuntimeError("a SyncClient cannot be used from its own event loop")
        done = threading.Event()
        tasks: list[asyncio.Task[R]] = []

        def start() -> None:
            task = self.loop.create_task(_awaited(awaitable))
            task.add_done_callback(lambda _: done.set())
            tasks.append(task)

        self.loop.call_soon_threadsafe(start)
        try:
            done.wait()
        except BaseException:  # KeyboardInterrupt included: stop the work too, and wait
            # until it has unwound, so that what comes next (closing an iterator, the
            # client) never meets it still running.
            self.loop.call_soon_threadsafe(lambda: tasks[0].cancel())
            done.wait(CANCEL_WAIT)
            raise
        return tasks[0].result()

    def iterate(self, items: AsyncIterator[R]) -> Generator[R, None, None]:
        try:
            while True:
                more, item = self.call(_next(items))
                if not more:
                    return
                yield cast(R, item)
        finally:
            close = getattr(items, "aclose", None)
            if close is not None and not self.loop.is_closed():
                self.call(close())

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _awaited(awaitable: Awaitable[R]) -> R:
    return await awaitable


async def _next(items: AsyncIterator[R]) -> tuple[bool, R | None]:
    try:
        return True, await anext(items)
    except StopAsyncIteration:
        return False, None


class _Bridge:
    """Something async (``_target``) driven through a portal."""

    def __init__(self, portal: _Portal, target: Any) -> None:
        self._portal = portal
        self._target = target


def _blocking(method: Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]
              ) -> Callable[Concatenate[_Bridge, P], R]:
    """The blocking twin of an async method."""
    def call(self: _Bridge, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._portal.call(method(self._target, *args, **kwargs))
    functools.update_wrapper(call, method)
    return call


def _iterating(method: Callable[Concatenate[Any, P], AsyncIterator[R]]
               ) -> Callable[Concatenate[_Bridge, P], Generator[R, None, None]]:
    """The blocking twin of an async generator method: a generator. Leaving its loop early
    (or ``close()``) closes the async one, which ends the HTTP response."""
    def call(self: _Bridge, /, *args: P.args, **kwargs: P.kwargs) -> Generator[R, None, None]:
        return self._portal.iterate(method(self._target, *args, **kwargs))
    functools.update_wrapper(call, method)
    return call


class _SyncContext(_Bridge):
    """A blocking ``with`` and ``for`` over an async context manager and iterator."""

    def __enter__(self) -> Self:
        self._portal.call(self._target.__aenter__())
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._portal.call(self._target.__aexit__(et, e, tb))


class SyncRun(_SyncContext):
    """``SyncClient.run``: enter it, read ``plan``, iterate the events (``Output``,
    ``Started``, ``Exit``, ``Unreachable``) until the run is done."""

    _target: RunConnection

    @property
    def plan(self) -> m.RunPlan | None:
        return self._target.plan

    def __iter__(self) -> Iterator[m.ServerFrame]:
        return self._portal.iterate(aiter(self._target))

    send_stdin = _blocking(RunConnection.send_stdin)
    resize = _blocking(RunConnection.resize)
    signal = _blocking(RunConnection.signal)
    cancel = _blocking(RunConnection.cancel)


class SyncAttachment(_SyncContext):
    """``SyncClient.attach``: iterate output (``bytes``) and control frames (``dict``);
    ``send`` input and ``resize`` the terminal."""

    _target: Attachment

    @property
    def offset(self) -> int:
        return self._target.offset

    @property
    def exit(self) -> dict[str, Any] | None:
        return self._target.exit

    def __iter__(self) -> Iterator[bytes | dict[str, Any]]:
        return self._portal.iterate(aiter(self._target))

    send = _blocking(Attachment.send)
    resize = _blocking(Attachment.resize)


class SyncClient(_Bridge):
    """The blocking ``Client``: same methods, same arguments, same errors."""

    _target: Client

    def __init__(self, url: str, token: str, *, timeout: float = 30.0,
                 reconnect_for: float = RECONNECT_FOR, ca: str = "") -> None:
        super().__init__(_Portal(), Client(url, token, timeout=timeout,
                                           reconnect_for=reconnect_for, ca=ca))

    @classmethod
    def from_config(cls, url: str | None = None, token: str | None = None) -> SyncClient:
        """URL and token from the arguments, else ``SHOAL_URL``/``SHOAL_TOKEN``, else
        ``$SHOAL_HOME/client.toml`` (which ``shoal up`` writes)."""
        found = Client.from_config(url, token)
        return cls(found.url, found.token, timeout=found.timeout,
                   reconnect_for=found.reconnect_for, ca=found.ca)

    @property
    def client(self) -> Client:
        """The async client underneath (its coroutines belong to this client's loop)."""
        return self._target

    @property
    def url(self) -> str:
        return self._target.url

    def close(self) -> None:
        """Close the HTTP connections and stop the loop thread."""
        if not self._portal.loop.is_closed():
            self._portal.call(self._target.close())
            self._portal.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    request = _blocking(Client.request)
    request_raw = _blocking(Client.request_raw)
    nodes = _blocking(Client.nodes)
    node_pages = _iterating(Client.node_pages)
    node_pages_raw = _iterating(Client.node_pages_raw)
    fleet = _blocking(Client.fleet)
    node = _blocking(Client.node)
    drain = _blocking(Client.drain)
    undrain = _blocking(Client.undrain)
    forget = _blocking(Client.forget)
    create_session = _blocking(Client.create_session)
    sessions = _blocking(Client.sessions)
    session = _blocking(Client.session)
    signal = _blocking(Client.signal)
    kill = _blocking(Client.kill)
    remove = _blocking(Client.remove)
    wait = _blocking(Client.wait)
    logs = _iterating(Client.logs)
    create_service = _blocking(Client.create_service)
    services = _blocking(Client.services)
    service = _blocking(Client.service)
    scale_service = _blocking(Client.scale_service)
    drain_service = _blocking(Client.drain_service)
    remove_service = _blocking(Client.remove_service)
    best = _blocking(Client.best)
    whoami = _blocking(Client.whoami)
    tokens = _blocking(Client.tokens)
    create_token = _blocking(Client.create_token)
    revoke_token = _blocking(Client.revoke_token)
    audit = _blocking(Client.audit)
    verify_audit = _blocking(Client.verify_audit)

    def run(self, targets: m.Targets, spec: m.RunSpec, *,
            connect_timeout: float = 5.0) -> SyncRun:
        """A run over the WebSocket: use it in ``with``, then iterate its events."""
        return SyncRun(self._portal, self._target.run(targets, spec,
                                                      connect_timeout=connect_timeout))

    def attach(self, session_id: str, start: int = 0, tail: int | None = None
               ) -> SyncAttachment:
        """Attach to a session's terminal: use it in ``with``, then iterate."""
        return SyncAttachment(self._portal, self._target.attach(session_id, start, tail))
