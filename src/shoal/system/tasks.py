"""Ending background tasks at a stop, for sure.

Python 3.11's ``asyncio.wait_for`` drops a cancel that arrives in the same turn as its
result (python/cpython#86296, fixed in 3.12): a loop cancelled just as a NATS reply came in
goes on as if never told, and a stop that cancels once and then gathers waits for it
forever: the likely cause of a `shoal up` that did not stop in CI, its controller's
services lease loop renewing every 1.25 s. So a stop cancels again until the task has
ended, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

STOP_BOUND = 10.0  # seconds a stop waits for its tasks before it leaves them be
RECANCEL_EVERY = 0.1  # a swallowed cancel is found and repeated this soon


async def end_tasks(tasks: Iterable[asyncio.Future[Any] | None],
                    bound: float = STOP_BOUND) -> None:
    """Cancel ``tasks`` (None ones skipped) and return once all have ended, cancelling any
    that went on; past ``bound`` seconds, log the ones still running and return."""
    everyone = [t for t in tasks if t is not None]
    pending = {t for t in everyone if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.error("still running %g s after being cancelled, left be: %s", bound,
                      ", ".join(sorted(_name(t) for t in pending)))
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY, left))
    for t in everyone:  # what they raised was theirs to say, not a stop's to re-raise
        if t.done() and not t.cancelled() and t.exception() is not None:
            log.debug("%s ended with %r", _name(t), t.exception())


def _name(t: asyncio.Future[Any]) -> str:
    if isinstance(t, asyncio.Task):
        return f"{t.get_name()} ({t.get_coro()!r:.80})"
    return repr(t)
