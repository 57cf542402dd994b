"""Security headers on every answer of the controller's own origin: pages, errors, API.

The CSP allows only our own scripts (no inline script, no eval), our own connections, and no
framing; pages hold nothing a search engine or cache should keep. Service traffic (``/s/``)
is the replicas' own and keeps their headers.
"""

from __future__ import annotations

from aiohttp import web

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; connect-src 'self'; object-src 'none'; frame-ancestors 'none'; "
       "base-uri 'none'; form-action 'self'")
EVERY_ANSWER = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}
PAGE = {"X-Robots-Tag": "noindex, nofollow", "Cache-Control": "no-store"}
SERVICE_PREFIX = "/s/"


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith(SERVICE_PREFIX):
        return
    for name, value in EVERY_ANSWER.items():
        response.headers.setdefault(name, value)


def install(app: web.Application) -> None:
    app.on_response_prepare.append(add_security_headers)
