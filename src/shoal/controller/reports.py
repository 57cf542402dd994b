"""What agents report on their own subjects (``shoal.report.<node>.*``), applied by the
controllers that own the records and streams.

Only the node's own credential may publish under its name (node identities), so the server
has said which node speaks; the controller then checks that the session's record names that
node before it acts. Today: ``trim``, an output cap's purge (a node credential may not purge
the shared output stream itself), and ``output``, where a session's stored output stands, for
the writer of its current attempt (a node credential may not read the output stream).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from ..logic.sessionstate import attempt_nodes
from ..natsio import outputlog
from ..natsio.bus import NATS_ERRORS
from ..natsio.sessionstore import SessionStore
from ..wire import subjects
from ..wire.reports import OutputTrim, OutputWhere, OutputWhereReply

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from .server import Controller

log = logging.getLogger(__name__)


class Reports:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        self._subs.append(await self.ctl.nc.subscribe(
            subjects.node_report("*", subjects.REPORT_TRIM), queue=subjects.REPORTS_QUEUE,
            cb=self._on_trim))
        self._subs.append(await self.ctl.nc.subscribe(
            subjects.node_report("*", subjects.REPORT_OUTPUT), queue=subjects.REPORTS_QUEUE,
            cb=self._on_where))

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except NATS_ERRORS:
                pass

    async def _on_trim(self, msg: Msg) -> None:
        node = msg.subject.split(".")[2]
        try:
            trim = msgspec.msgpack.decode(msg.data, type=OutputTrim)
        except msgspec.DecodeError as e:
            log.warning("bad output trim from %s: %s", node, e)
            return
        assert self.ctl.buckets is not None
        found = await SessionStore(self.ctl.buckets.sessions).get(trim.session)
        if found is None or found[0].node != node:
            log.warning("node %s asked to trim the output of session %s, which it does not "
                        "run: ignored", node, trim.session)
            return
        try:
            await outputlog.trim_before(self.ctl.js, trim.session, trim.keep)
        except Exception as e:  # NATS away: the next trim of this session covers this one
            log.info("trimming the output of %s: %s", trim.session, e)

    async def _on_where(self, msg: Msg) -> None:
        node = msg.subject.split(".")[2]
        try:
            where = msgspec.msgpack.decode(msg.data, type=OutputWhere)
        except msgspec.DecodeError as e:
            log.warning("bad output request from %s: %s", node, e)
            return
        try:
            assert self.ctl.buckets is not None
            found = await SessionStore(self.ctl.buckets.sessions).get(where.session)
            record = found[0] if found is not None else None
            if record is None or record.node != node or record.attempt != where.epoch:
                # Also how a zombie learns that a newer attempt owns the output.
                reply = OutputWhereReply(ok=False, reason=f"attempt {where.epoch} of "
                                         f"{where.session} is not node {node}'s")
            else:
                last = await outputlog.last_output(self.ctl.js, where.session,
                                                   attempt_nodes(record))
                reply = OutputWhereReply(ok=True, last=last)
            await msg.respond(msgspec.msgpack.encode(reply))
        except NATS_ERRORS as e:  # the agent asks again
            log.info("output request of %s for %s: %s", node, where.session, e)
