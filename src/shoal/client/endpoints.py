"""Which controller to talk to: a ``url`` may list a cluster's controllers, comma-separated.

Apart from ``shoal.client.aio`` so that ``shoal run`` (a WebSocket of its own, no aiohttp)
can pick a controller without importing aiohttp, a tenth of a second of its start-up.
"""

from __future__ import annotations

import socket


def controller_urls(url: str) -> list[str]:
    """The controllers of a comma-separated ``url`` (client.toml lists every one of a
    cluster's controllers), in order."""
    return [u.strip().rstrip("/") for u in url.split(",") if u.strip()] or [url.rstrip("/")]


def first_reachable(url: str, timeout: float = 1.0) -> str:
    """The first of the controllers in ``url`` that accepts a TCP connection, else the
    first one (whose error then names it). For one-shot commands, before they connect."""
    from urllib.parse import urlsplit

    urls = controller_urls(url)
    if len(urls) == 1:
        return urls[0]
    for u in urls:
        parts = urlsplit(u)
        port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", port), timeout).close()
            return u
        except OSError:
            continue
    return urls[0]
