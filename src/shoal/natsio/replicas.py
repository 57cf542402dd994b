"""How many servers keep each of shoal's JetStream assets, and raising that on a live fleet.

shoal's state is a handful of streams: the key-value buckets (``KV_shoal-*``) and the output
stream (``shoal-output``). On one nats-server each has one replica; on a cluster it should have
three (or as many as there are servers, when fewer), so that losing a server loses nothing.
``wanted`` decides (pure); ``cluster_size`` asks the server we are connected to; ``lagging``
lists assets below the wanted count; ``upgrade`` raises them through the JetStream API
(a stream update with a new ``num_replicas``: NATS copies the data to the new peers itself).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient

from ..errors import ConnectError, ShoalError

MAX_REPLICAS = 3  # what NATS recommends: R3 survives one lost server; R5 buys little here
STREAM_PREFIXES = ("KV_shoal-", "shoal-")
API_TIMEOUT = 5.0


def wanted(configured: int, cluster_size: int) -> int:
    """Replicas for shoal's assets: ``configured`` when set (> 0), else 3, or the cluster's
    size when it is smaller; never more than the cluster has servers."""
    size = max(1, cluster_size)
    if configured > 0:
        return min(configured, size)
    return min(MAX_REPLICAS, size)


def cluster_size(nc: NatsClient) -> int:
    """Servers in the cluster of the server ``nc`` is connected to; 1 when not clustered.

    The server's INFO names its cluster and lists every member's client URL
    (``connect_urls``: the NATS protocol's own view of the cluster, as clients use it to
    fail over). nats-py keeps the INFO it connected with but does not publish it, hence
    the private attribute. A cluster that hides its URLs (``no_advertise``) counts as 1:
    set ``replicas`` explicitly there."""
    info: dict[str, Any] = getattr(nc, "_server_info", {}) or {}
    if not info.get("cluster"):
        return 1
    return max(1, len(set(info.get("connect_urls") or [])))


def is_shoal_stream(name: str) -> bool:
    return name.startswith(STREAM_PREFIXES)


@dataclass(frozen=True)
class Asset:
    stream: str
    replicas: int
    current: int  # replicas that are caught up (the leader counts); == replicas when healthy


async def _api(nc: NatsClient, subject: str, body: Any = None) -> dict[str, Any]:
    payload = b"" if body is None else msgspec.json.encode(body)
    try:
        msg = await nc.request(subject, payload, timeout=API_TIMEOUT)
    except Exception as e:  # timeouts, no responders: JetStream is not there or not ready
        raise ConnectError(f"JetStream did not answer {subject}: {e!r}; is the NATS cluster "
                           "up and does it have a JetStream meta leader?") from e
    reply: dict[str, Any] = msgspec.json.decode(msg.data)
    err = reply.get("error")
    if err:
        raise ShoalError(f"JetStream refused {subject}: {err.get('description', err)}")
    return reply


async def assets(nc: NatsClient) -> list[Asset]:
    """shoal's streams in this account, each with its replica count."""
    names: list[str] = []
    offset = 0
    while True:
        page = await _api(nc, "$JS.API.STREAM.NAMES", {"offset": offset})
        got = page.get("streams") or []
        names += got
        offset += len(got)
        if not got or offset >= page.get("total", 0):
            break
    out = []
    for name in sorted(n for n in names if is_shoal_stream(n)):
        info = await _api(nc, f"$JS.API.STREAM.INFO.{name}")
        out.append(_asset(name, info))
    return out


def _asset(name: str, info: dict[str, Any]) -> Asset:
    replicas = int(info["config"].get("num_replicas") or 1)
    cluster = info.get("cluster") or {}
    peers = cluster.get("replicas") or []
    current = (1 if cluster.get("leader") else 0) + sum(1 for p in peers if p.get("current"))
    return Asset(name, replicas, current if cluster else 1)


def lagging(found: list[Asset], want: int) -> list[Asset]:
    """The assets with fewer replicas than ``want``."""
    return [a for a in found if a.replicas < want]


def advice(found: list[Asset], want: int, size: int) -> str | None:
    """What to tell an operator whose fleet has fewer replicas than the cluster allows."""
    low = lagging(found, want)
    if not low:
        return None
    names = ", ".join(f"{a.stream} (R{a.replicas})" for a in low)
    return (f"the NATS cluster has {size} servers and allows {want} replicas, but {names} "
            f"{'has' if len(low) == 1 else 'have'} fewer: losing one server can lose them. "
            f"Run `shoal admin upgrade-replicas` to raise them to {want}")


async def upgrade(nc: NatsClient, want: int, wait: float = 30.0) -> list[tuple[str, int, int]]:
    """Raise every shoal stream below ``want`` replicas to ``want``, then wait (up to
    ``wait`` s) until the new copies have caught up. Returns (stream, before, after) for
    each stream changed. The update carries the stream's own config back unchanged but for
    ``num_replicas``, so fields this client does not know survive."""
    changed = []
    for a in lagging(await assets(nc), want):
        info = await _api(nc, f"$JS.API.STREAM.INFO.{a.stream}")
        config = dict(info["config"])
        config["num_replicas"] = want
        await _api(nc, f"$JS.API.STREAM.UPDATE.{a.stream}", config)
        changed.append((a.stream, a.replicas, want))
    deadline = time.monotonic() + wait
    pending = {name for name, _, _ in changed}
    while pending and time.monotonic() < deadline:
        for name in sorted(pending):
            info = await _api(nc, f"$JS.API.STREAM.INFO.{name}")
            if _asset(name, info).current >= want:
                pending.discard(name)
        if pending:
            await asyncio.sleep(0.2)
    if pending:
        raise ShoalError(f"raised to {want} replicas, but {', '.join(sorted(pending))} "
                         f"had not caught up after {wait:g}s; check again with "
                         "`shoal admin upgrade-replicas --dry-run`")
    return changed
