"""The server side's one error map: what status and message an exception becomes, for the
HTTP API and the NATS JSON API alike (the client side's map is ``errors.error_for_status``).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import nats.js.errors
from aiohttp import web

from ..errors import ShoalError, Unavailable
from ..natsio.bus import NATS_ERRORS
from ..wire import api as w

RETRY_AFTER = 2  # seconds a client waits before asking again while NATS is away


@dataclass(frozen=True)
class Failure:
    """An error as a client hears it; ``retry_after`` (seconds) when trying again helps."""

    status: int
    message: str
    retry_after: float | None = None


def status_of(e: BaseException) -> int:
    return failure(e).status


def failure(e: BaseException) -> Failure:
    """The one mapping of errors to answers. A NATS failure under a request gets a reason
    and when to retry, never an empty 504 (what aiohttp makes of a TimeoutError)."""
    if isinstance(e, Unavailable):
        return Failure(503, e.message, max(1, round(e.retry_after)))
    if isinstance(e, ShoalError):
        return Failure(e.status, e.message)
    if isinstance(e, msgspec.ValidationError):
        return Failure(422, f"invalid request: {e}")
    if isinstance(e, msgspec.DecodeError):
        return Failure(400, f"the body is not valid JSON: {e}")
    if isinstance(e, nats.js.errors.InvalidKeyError):  # a name from the request: not NATS's
        return Failure(400, "a name in the request cannot be stored: use letters, digits and "
                            "- _ = . / only")
    if isinstance(e, NATS_ERRORS):
        what = str(e) or type(e).__name__
        if isinstance(e, TimeoutError):
            return Failure(504, f"NATS did not answer in time ({what}): the message bus is "
                                f"slow or restarting; retry in {RETRY_AFTER} s", RETRY_AFTER)
        return Failure(503, f"NATS is not reachable ({what}); retry in {RETRY_AFTER} s",
                       RETRY_AFTER)
    return Failure(500, f"internal error: {str(e) or type(e).__name__}")


def is_nats_failure(e: BaseException) -> bool:
    return isinstance(e, NATS_ERRORS) and not isinstance(e, ShoalError)


def error_json(status: int, message: str) -> web.Response:
    return web.Response(body=msgspec.json.encode(w.Error(error=message, status=status)),
                        status=status, content_type="application/json")


def error_response(e: BaseException) -> web.Response:
    f = failure(e)
    resp = error_json(f.status, f.message)
    if f.retry_after is not None:
        resp.headers["Retry-After"] = str(round(f.retry_after))
    return resp


def nats_error(e: BaseException) -> w.NatsReply:
    f = failure(e)
    return w.NatsReply(ok=False, status=f.status, error=f.message)
