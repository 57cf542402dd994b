"""Session reports to the controllers (``shoal.wire.reports``), which own the records.

A report is a request; it is asked again until a controller answers (each try bounded, the
wait between tries growing to a few seconds), so a session that ends while no controller
runs is recorded once one is back. The caller awaits it: a session's reports go one at a
time, in order, and one session waiting never holds up another or the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec

from ..errors import ShoalError
from ..natsio import rpc
from ..wire import reports as r
from ..wire import subjects

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient

log = logging.getLogger(__name__)

TRY_TIMEOUT = 5.0  # one try: a busy controller answers well within it
MAX_PAUSE = 2.0  # between tries, at most
SAY_AGAIN = 60.0  # how often unanswered reports are logged, at most


class Reporter:
    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._said = -SAY_AGAIN  # when an unanswered report was last logged (one line for all)

    async def once(self, node: str, report: r.SessionReport,
                   timeout: float = TRY_TIMEOUT) -> r.SessionReportReply:
        """One try; raises ``ShoalError`` when no controller answered."""
        data = await rpc.request(self.nc, subjects.node_report(node, subjects.REPORT_SESSION),
                                 r.pack(report), timeout)
        try:
            return r.unpack_reply(data)
        except msgspec.DecodeError as e:
            raise ShoalError(f"a controller answered a session report with {e}") from e

    async def send(self, node: str, report: r.SessionReport,
                   give_up: Callable[[], bool] = lambda: False) -> r.SessionReportReply | None:
        """Until a controller answers (None once ``give_up()`` says the answer no longer
        matters)."""
        pause = 0.1
        while not give_up():
            try:
                return await self.once(node, report)
            except ShoalError as e:
                now = time.monotonic()
                if now - self._said >= SAY_AGAIN:
                    log.warning("no controller took a report of node %s (%s): %s; asking "
                                "again until one does", node, type(report).__name__, e)
                    self._said = now
            await asyncio.sleep(pause)
            pause = min(MAX_PAUSE, pause * 2)
        return None
