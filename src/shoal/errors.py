"""The shoal error tree. Every error says what went wrong and what to do about it.

    ShoalError
    ├── ConfigError          bad or missing configuration, bad flags
    ├── ValidationError      a request that is malformed or out of bounds (HTTP 400/422)
    ├── ConnectError         cannot reach NATS or the controller
    │   └── AuthError        reached it, but the credentials were refused (HTTP 401)
    │       └── Forbidden    the credentials are good but lack a scope (HTTP 403)
    ├── NotFoundError        no such node, session or service (HTTP 404)
    ├── ConflictError        the request contradicts current state (HTTP 409)
    │   └── IllegalTransition  a session record asked to move where its lifecycle cannot go
    ├── NoCapacityError      no node has room (HTTP 503)
    │   └── NoReplicaError   no replica of a service can take a client now
    ├── Unavailable          not now: NATS is away or the view is stale; retry (HTTP 503 with
    │                        Retry-After)
    ├── UserError            the agent could not make a throwaway user
    ├── RemoteTimeout        the other side did not answer in time
    │   └── NoResponder      nobody serves that subject (its agent is not connected)
    └── ProtocolError        a peer sent something we cannot decode

Errors of the libraries we use (nats-py, aiohttp) are translated at one boundary each:
``shoal.natsio.bus`` for NATS and ``shoal.client.aio`` for HTTP. Each side of the API has
one map between errors and statuses: the servers' ``shoal.controller.replies.failure``
(HTTP and NATS alike) and the clients' ``error_for_status`` below.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error shoal raises on purpose."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ShoalError):
    status = 400


class ValidationError(ShoalError):
    status = 400


class ConnectError(ShoalError):
    status = 502


class AuthError(ConnectError):
    status = 401


class Forbidden(AuthError):
    status = 403


class NotFoundError(ShoalError):
    status = 404


class ConflictError(ShoalError):
    status = 409


class IllegalTransition(ConflictError):
    """A write would move a session where ``shoal.logic.sessionstate`` says it cannot go
    (a bug in the writer, or a record changed by someone who should not): nothing is stored."""

    def __init__(self, session: str, old: str, new: str, why: str = "") -> None:
        super().__init__(f"session {session or '?'} cannot go from {old} to {new}"
                         + (f": {why}" if why else ""))
        self.old = old
        self.new = new


class NoCapacityError(ShoalError):
    status = 503


class NoReplicaError(NoCapacityError):
    """No replica can take a client now (HTTP 503)."""


class Unavailable(ShoalError):
    """Not now, but soon: the fleet's NATS is away or this controller's view of the fleet
    is not current. Nothing was changed; try again after ``retry_after`` seconds."""

    status = 503

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UserError(ShoalError):
    """A throwaway user could not be made (no UIDs left, not root, useradd failed)."""


class RemoteTimeout(ShoalError):
    status = 504


class NoResponder(RemoteTimeout):
    """Nobody listens on the subject asked: the node's agent is not running or not
    connected (NATS says so at once, without waiting out the timeout)."""


class ProtocolError(ShoalError):
    status = 502


_BY_STATUS: dict[int, type[ShoalError]] = {
    400: ValidationError,
    401: AuthError,
    403: Forbidden,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    422: ValidationError,
    503: NoCapacityError,
    504: RemoteTimeout,
}


def error_for_status(status: int, message: str,
                     retry_after: float | None = None) -> ShoalError:
    """The error a client raises for an HTTP error answer (a 503 with ``Retry-After`` is
    ``Unavailable``: retry later)."""
    if status == 503 and retry_after is not None:
        return Unavailable(message, retry_after)
    return _BY_STATUS.get(status, ShoalError)(message)
