"""Requests over NATS with nats-py's errors translated to shoal's (``shoal.errors``), so the
controller and agent modules above never catch a NATS type."""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from ..errors import ConnectError, NoResponder, RemoteTimeout


async def request(nc: NatsClient, subject: str, payload: bytes, timeout: float) -> bytes:
    """The answer's payload. Raises ``NoResponder`` when nobody serves ``subject``,
    ``RemoteTimeout`` when nobody answered within ``timeout`` seconds, ``ConnectError``
    when the connection is closed or draining."""
    try:
        msg = await nc.request(subject, payload, timeout=timeout)
    except nats.errors.NoRespondersError as e:
        raise NoResponder(f"nobody serves {subject}") from e
    except (nats.errors.TimeoutError, TimeoutError) as e:
        raise RemoteTimeout(f"no answer on {subject} in {timeout:g}s") from e
    except nats.errors.Error as e:
        raise ConnectError(f"request on {subject} failed: {e or type(e).__name__}") from e
    return msg.data
