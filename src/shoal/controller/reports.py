"""What agents report on their own subjects (``shoal.report.<node>.*``), applied by the
controllers that own the records and streams.

Only the node's own credential may publish under its name (node identities), so the server
has said which node speaks; the controller then checks that the session's record names that
node (and that placement's attempt) before it acts. ``trim``: an output cap's purge (a node
credential may not purge the shared output stream itself). ``session``: what happened to a
node's session (``shoal.wire.reports``), written by compare-and-set with the fence
(attempt, node); a request, answered so the agent knows it is recorded (or refused).
``output``: where a session's stored output stands, for the writer of its current attempt
(a node credential may not read the output stream).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from ..errors import IllegalTransition, ShoalError
from ..logic.sessionstate import FINAL, LIVE, attempt_nodes
from ..natsio import outputlog
from ..natsio.bus import NATS_ERRORS
from ..natsio.sessionstore import Fenced, SessionCache, SessionStore
from ..wire import reports as r
from ..wire import subjects
from ..wire.reports import OutputTrim, OutputWhere, OutputWhereReply, SessionReportReply

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from .server import Controller

log = logging.getLogger(__name__)
T = TypeVar("T")

MOVE_FIELDS = ("pid", "started", "restarts", "user", "exit_code", "signal", "reason",
               "output_bytes")
OK = SessionReportReply(ok=True)
REPORT_ERRORS: tuple[type[BaseException], ...] = (ShoalError, *NATS_ERRORS)


class Reports:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        nc = self.ctl.nc
        self._subs.append(await nc.subscribe(
            subjects.node_report("*", subjects.REPORT_TRIM), queue=subjects.REPORTS_QUEUE,
            cb=self._on_trim))
        self._subs.append(await nc.subscribe(
            subjects.node_report("*", subjects.REPORT_SESSION), queue=subjects.REPORTS_QUEUE,
            cb=self._on_session))
        self._subs.append(await nc.subscribe(
            subjects.node_report("*", subjects.REPORT_OUTPUT), queue=subjects.REPORTS_QUEUE,
            cb=self._on_where))

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except NATS_ERRORS:
                pass

    async def _on_trim(self, msg: Msg) -> None:
        node, trim = _decoded(msg, OutputTrim, "output trim")
        if trim is None:
            return
        found = await self.ctl.sessions.store.get(trim.session)
        if found is None or found[0].node != node:
            log.warning("node %s asked to trim the output of session %s, which it does not "
                        "run: ignored", node, trim.session)
        else:
            try:
                await outputlog.trim_before(self.ctl.js, trim.session, trim.keep)
            except Exception as e:  # NATS away: the next trim of this session covers this one
                log.info("trimming the output of %s: %s", trim.session, e)
        if msg.reply:  # done (or refused): the writer sends its next trim
            try:
                await msg.respond(b"")
            except NATS_ERRORS as e:
                log.info("cannot answer node %s: %s", node, e)

    async def _on_where(self, msg: Msg) -> None:
        node, where = _decoded(msg, OutputWhere, "output request")
        if where is None:
            return
        try:
            found = await self.ctl.sessions.store.get(where.session)
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

    async def _on_session(self, msg: Msg) -> None:
        # One task each: nats-py runs a subscription's callbacks one at a time, and a node
        # sends its next report on a session only once this one is answered.
        task = asyncio.create_task(self._session(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _session(self, msg: Msg) -> None:
        node = msg.subject.split(".")[2]
        try:
            report = r.unpack_report(msg.data)
        except msgspec.DecodeError as e:
            log.warning("bad session report from node %s: %s", node, e)
            reply = SessionReportReply(ok=False, refused="bad", reason=f"bad report: {e}")
        else:
            try:
                reply = await SessionReports(self.ctl.sessions.store,
                                             self.ctl.sessions.cache).apply(node, report)
            except REPORT_ERRORS as e:  # no answer: the node asks again
                log.info("session report from %s not applied yet: %s", node, e)
                return
            except Exception as e:  # a bug: said once, never asked again and again
                log.exception("session report from node %s failed", node)
                reply = SessionReportReply(ok=False, refused="bad", reason=f"{e}")
        try:
            await msg.respond(r.pack(reply))
        except NATS_ERRORS as e:
            log.info("cannot answer node %s: %s", node, e)


def _decoded(msg: Msg, kind: type[T], what: str) -> tuple[str, T | None]:
    """The reporting node (the subject's, which only its credential may publish) and the
    report, or None (said in the log) if it does not decode."""
    node = msg.subject.split(".")[2]
    try:
        return node, msgspec.msgpack.decode(msg.data, type=kind)
    except msgspec.DecodeError as e:
        log.warning("bad %s from %s: %s", what, node, e)
        return node, None


class SessionReports:
    """A node's session reports, applied to the records it runs."""

    def __init__(self, store: SessionStore, cache: SessionCache) -> None:
        self.store = store
        self.cache = cache

    async def apply(self, node: str, report: r.SessionReport) -> SessionReportReply:
        match report:
            case r.SessionMove():
                fields = {f: getattr(report, f) for f in MOVE_FIELDS
                          if getattr(report, f) is not msgspec.UNSET}
                return await self._fenced(node, report.session, report.attempt,
                                          lambda fence: self.store.move(
                                              report.session, report.state, fence=fence,
                                              **fields))
            case r.SessionReschedule():
                return await self._fenced(node, report.session, report.attempt,
                                          lambda fence: self.store.reschedule(
                                              report.session, report.why, fence=fence,
                                              output_bytes=report.output_bytes),
                                          rescheduling=True)
            case r.SessionDropped():
                return await self._drop(node, report.session, report.attempt, report.why)
            case r.SessionsRestarted():
                return await self._restarted(node)
            case r.SessionsCheck():
                return SessionReportReply(ok=True, gone=await self._check(node, report.sessions))
        raise AssertionError(report)  # pragma: no cover: the union is closed

    async def _fenced(self, node: str, sid: str, attempt: int, write: Any,
                      rescheduling: bool = False) -> SessionReportReply:
        try:
            await write((attempt, node))
        except Fenced as e:
            rec = e.record
            if rescheduling and rec.state == "pending" and rec.attempt == attempt \
                    and rec.requeued == "rescheduled":
                return OK  # our own earlier answer was lost: already done
            if rec.node != node:
                log.warning("node %s reported on session %s, which %s: refused, the record "
                            "is unchanged", node, sid,
                            f"runs on {rec.node}" if rec.node else "runs on no node")
                return SessionReportReply(ok=False, refused="not_yours", reason=str(e))
            return SessionReportReply(ok=False, refused="fenced", reason=str(e))
        except IllegalTransition as e:
            log.warning("node %s: %s", node, e)
            return SessionReportReply(ok=False, refused="illegal", reason=str(e))
        return OK

    async def _drop(self, node: str, sid: str, attempt: int, why: str) -> SessionReportReply:
        found = await self.store.get(sid)
        if found is None:
            return OK
        if found[0].spec.restart != "never":
            return await self._fenced(node, sid, attempt, lambda fence: self.store.reschedule(
                sid, why, fence=fence, only_from=LIVE), rescheduling=True)
        return await self._fenced(node, sid, attempt, lambda fence: self.store.move(
            sid, "lost", fence=fence, reason=why))

    async def _restarted(self, node: str) -> SessionReportReply:
        """Records that say a session runs on ``node``, from before its agent's restart:
        their processes ended with the old agent. Each is fenced by the attempt seen, so a
        placement made since is never touched."""
        why = f"agent of {node} restarted"
        count = 0
        for rec in [x for x in self.cache.records.values()
                    if x.node == node and x.state in LIVE]:
            if (await self._drop(node, rec.id, rec.attempt, why)).ok:
                count += 1
        if count:
            log.info("node %s restarted: %d session(s) it ran were rescheduled or lost",
                     node, count)
        return SessionReportReply(ok=True, count=count)

    async def _check(self, node: str, sessions: dict[str, int]) -> dict[str, str]:
        gone: dict[str, str] = {}
        for sid, attempt in sessions.items():
            rec = self.cache.records.get(sid)
            if rec is not None and _still(rec.node, rec.attempt, rec.state, node, attempt):
                continue
            found = await self.store.get(sid)  # the cache may lag: ask the bucket
            if found is None:
                gone[sid] = "its record was removed"
            elif not _still(found[0].node, found[0].attempt, found[0].state, node, attempt):
                gone[sid] = "the fleet gave this session up (node was unreachable)"
        return gone


def _still(rnode: str, rattempt: int, state: str, node: str, attempt: int) -> bool:
    return rnode == node and rattempt == attempt and state not in FINAL
