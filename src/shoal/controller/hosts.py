"""The ``Host`` check: the controller answers only for the names it is known by.

A DNS-rebinding page (``evil.example`` resolving to 127.0.0.1) is same-origin with itself
and reaches a loopback controller with ``Host: evil.example``; refusing names we were not
told about (421, "misdirected request") closes that door. Allowed by default: ``localhost``,
IP literals of this machine (an address cannot be rebound), the bound address, the hosts of
``public_url`` and ``services_url``, and ``allowed_hosts`` (``"*"`` turns the check off, for
a proxy in front that checks ``Host`` itself). The services listener applies it too.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ..config import ControllerConfig
from .auth import error_json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
EXEMPT = frozenset({"/healthz"})  # load balancers probe by address; it tells nothing
WILDCARD = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]
    addresses: frozenset[str]
    any_host: bool = False


def hostname(host_header: str) -> str | None:
    """The name in a ``Host`` header, lower case, without port, brackets or final dot."""
    try:
        name = urlsplit("//" + host_header).hostname
    except ValueError:
        return None
    return name.rstrip(".") if name else None


def local_addresses() -> set[str]:
    import psutil

    found = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family.name in ("AF_INET", "AF_INET6"):
                found.add(a.address.split("%")[0])
    return found


def policy(cfg: ControllerConfig) -> HostPolicy:
    names = {"localhost"}
    names.update(h.strip().lower().rstrip(".") for h in cfg.allowed_hosts if h.strip())
    for url in (cfg.public_url, cfg.services_url):  # both listeners answer for both names
        public = hostname(urlsplit(url).netloc) if url else None
        if public:
            names.add(public)
    addresses: set[str] = set()
    if cfg.host in WILDCARD:
        addresses = local_addresses()  # reachable on every address of the machine
    else:
        names.add(cfg.host.lower())
    return HostPolicy(frozenset(names), frozenset(addresses), "*" in names)


def host_ok(host_header: str, rules: HostPolicy) -> bool:
    if rules.any_host:
        return True
    name = hostname(host_header)
    if name is None:
        return False
    if name in rules.names:
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    return ip.is_loopback or str(ip) in rules.addresses


def host_middleware(cfg: ControllerConfig) -> Callable[..., Awaitable[web.StreamResponse]]:
    rules = policy(cfg)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if request.path not in EXEMPT and not host_ok(host, rules):
            return error_json(421, f"this controller does not answer for host {host!r}: "
                                   "use its own address, or add the name to allowed_hosts "
                                   "(or set public_url) in controller.toml")
        return await handler(request)

    return middleware
