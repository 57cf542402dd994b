"""Health probes: a TCP connect, or an HTTP GET on a path, to each replica's port.

One task per replica, every ``interval`` seconds (first one after a random fraction of it,
so that replicas are not probed in lockstep). A probe opens a socket itself: no shell, no
external program. Every probe is bounded by ``timeout``; a probe that hangs is a failure.
Results go to a callback (the service manager feeds them to the balancer).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..system.tasks import end_tasks

log = logging.getLogger(__name__)

MAX_STATUS_LINE = 4096


@dataclass(frozen=True)
class ProbeSpec:
    host: str
    port: int
    kind: str  # "tcp" | "http"
    path: str = ""
    interval: float = 2.0
    timeout: float = 1.0


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float
    error: str = ""


Report = Callable[[str, ProbeSpec, ProbeResult], None]


async def probe(spec: ProbeSpec) -> ProbeResult:
    """One probe, never longer than ``spec.timeout``."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == "http":
                error = await _http(spec)
            else:
                error = await _tcp(spec)
    except TimeoutError:
        error = f"no answer within {spec.timeout:g}s"
    except OSError as e:
        error = e.strerror or str(e) or type(e).__name__
    latency = time.monotonic() - start
    return ProbeResult(ok=not error, latency=latency, error=error)


async def _tcp(spec: ProbeSpec) -> str:
    _, writer = await asyncio.open_connection(spec.host, spec.port)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return ""


async def _http(spec: ProbeSpec) -> str:
    reader, writer = await asyncio.open_connection(spec.host, spec.port)
    try:
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        writer.write(f"GET {spec.path} HTTP/1.1\r\nHost: {host}:{spec.port}\r\n"
                     "User-Agent: shoal-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
                     .encode("latin-1"))
        await writer.drain()
        line = await reader.readline()
        if not line:
            return "the connection closed before an HTTP answer"
        if len(line) > MAX_STATUS_LINE:
            return "not an HTTP answer"
        parts = line.decode("latin-1").split(None, 2)
        ok = len(parts) >= 2 and parts[0].startswith("HTTP/") and parts[1].isascii() \
            and parts[1].isdigit()
        if not ok:
            return f"not an HTTP answer: {line[:60]!r}"
        status = int(parts[1])
        if not 200 <= status < 400:
            return f"HTTP {status} on {spec.path}"
        return ""
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


class Prober:
    """Keeps one probe loop per replica key; ``ensure`` (re)starts it, ``discard`` ends it."""

    def __init__(self, report: Report) -> None:
        self.report = report
        self.tasks: dict[str, tuple[ProbeSpec, asyncio.Task[None]]] = {}

    def ensure(self, key: str, spec: ProbeSpec) -> None:
        current = self.tasks.get(key)
        if current is not None and current[0] == spec and not current[1].done():
            return
        if current is not None:
            current[1].cancel()
        self.tasks[key] = (spec, asyncio.create_task(self._loop(key, spec)))

    def discard(self, key: str) -> None:
        current = self.tasks.pop(key, None)
        if current is not None:
            current[1].cancel()

    def keys(self) -> set[str]:
        return set(self.tasks)

    async def stop(self) -> None:
        tasks = [t for _, t in self.tasks.values()]
        self.tasks.clear()
        await end_tasks(tasks)

    async def _loop(self, key: str, spec: ProbeSpec) -> None:
        await asyncio.sleep(random.uniform(0, min(spec.interval, 0.2)))
        while True:
            started = time.monotonic()
            try:
                result = await probe(spec)
                self.report(key, spec, result)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the probing
                log.exception("probe of %s failed", key)
            await asyncio.sleep(max(0.0, spec.interval - (time.monotonic() - started)))
