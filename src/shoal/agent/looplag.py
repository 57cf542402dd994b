"""How long this process's event loop went without running: the agent's test of "was I
away?" (SIGSTOPped, frozen, swapped out) for self-fencing.

A coroutine that waits on NATS is not away, however long the wait: a heartbeat put that
times out after 5 s while a stream elects its leader must not look like a stopped agent.
A ticker that only sleeps sees the difference: its sleeps overrun only when the whole loop
did not run.
"""

from __future__ import annotations

import asyncio
import time

TICK = 0.25


class LoopLag:
    def __init__(self) -> None:
        self._last = time.monotonic()
        self._worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._last = time.monotonic()
        self._task = asyncio.create_task(self._tick())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def take(self) -> float:
        """The longest time the loop did not run since the last call (a gap still open
        counts: the ticker may not have woken yet after a SIGCONT)."""
        now = time.monotonic()
        worst = max(self._worst, now - self._last)
        self._worst, self._last = 0.0, now  # a gap is counted once
        return worst

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            self._worst = max(self._worst, now - self._last)
            self._last = now
