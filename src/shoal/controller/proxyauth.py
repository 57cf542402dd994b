"""Login through a trusted reverse proxy: the proxy authenticates the person (SSO, OAuth,
client certificates, LDAP...) and names them in a header, ttyd's ``--auth-header`` and
JupyterHub's ``REMOTE_USER`` style; shoal decides what that user may do.

Off unless ``proxy_user_header`` is set. The header is believed only on a connection whose
peer is one of ``trusted_proxies``: anyone else can send it too, so from any other peer it
is ignored (and the request is as anonymous as it would be without it). A named user gets
the grants of ``proxy_users[user]``, else ``proxy_user_scopes`` (``read`` unless set): the
proxy proves who someone is, the controller's configuration says what they may do, and a
user nobody configured can look but not touch.

A proxy-authenticated browser still gets a shoal login (cookie and CSRF token, logins.py):
the header rides on every request the browser makes, cross-site ones included, exactly as a
cookie does, so it must not open the API by itself. The login is of token ``proxy`` and is
honoured only while the trusted proxy still names the same user, so logging out at the proxy
(or reaching the controller around it) ends it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import ConfigError, ValidationError
from .apitokens import USER
from .scopes import Grant, Principal, parse_grants

if TYPE_CHECKING:
    from ..config import ControllerConfig

PROXY_TOKEN_ID = "proxy"  # the token id of proxy logins, in whoami and the audit trail


class ProxyAuth:
    def __init__(self, header: str, trusted: list[str], default: tuple[Grant, ...],
                 users: dict[str, tuple[Grant, ...]]) -> None:
        self.header = header
        self.trusted = frozenset(trusted)
        self.default = default
        self.users = users

    @classmethod
    def from_config(cls, cfg: ControllerConfig) -> ProxyAuth | None:
        """The proxy login the configuration asks for, or None (off); ConfigError saying what
        to fix when it cannot work."""
        if not cfg.proxy_user_header:
            return None
        if not cfg.trusted_proxies:
            raise ConfigError("proxy_user_header is set but trusted_proxies is empty: list "
                              "the reverse proxy's address there (from any other address the "
                              "header is ignored, so nobody could log in this way)")
        try:
            default = parse_grants(cfg.proxy_user_scopes)
            users = {}
            for user, grants in cfg.proxy_users.items():
                if not USER.match(user):
                    raise ValidationError(f"user {user!r}: letters, digits and _.@- (up to 64)")
                users[user] = parse_grants(grants)
        except ValidationError as e:
            raise ConfigError(f"proxy_user_scopes / proxy_users: {e.message}") from None
        return cls(cfg.proxy_user_header, cfg.trusted_proxies, default, users)

    def user(self, request: web.Request) -> str | None:
        """The user the trusted proxy in front of this request names, else None: no header,
        a peer that is not a trusted proxy, or a name that is not a valid user name."""
        if (request.remote or "") not in self.trusted:
            return None
        name = request.headers.get(self.header, "").strip()
        return name if USER.match(name) else None

    def principal(self, user: str) -> Principal:
        return Principal(user, PROXY_TOKEN_ID, self.users.get(user, self.default))
