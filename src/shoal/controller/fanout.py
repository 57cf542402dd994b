"""The run engine: start one command on many nodes over NATS and stream back their events.

A run has an id. The engine subscribes to the run's event subject first, then sends one
request per agent process that serves several of the nodes (``RunBatch`` to its lead node:
acknowledged at once, then the pids come in groups as ``RunBatchStarted``), and one request
per node otherwise (and in rolling runs); each agent answers at once (accepted, refused, or
already exited, e.g. command not found) and then publishes output and exit events. Output
is acknowledged after the consumer has taken it, which is the credit that lets the agent
read more (see ``shoal.agent.runs``). Stdin is broadcast with offsets and sent only while
every live node has written all but ``STDIN_WINDOW`` bytes of it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from ..errors import NoResponder, RemoteTimeout
from ..logic.nodeset import NodeSet
from ..natsio import rpc
from ..system.malloc import reuse_heap_for_bulk_io
from ..wire import messages as m
from ..wire import subjects

if TYPE_CHECKING:
    from ..natsio.types import Msg, NatsClient, Subscription

log = logging.getLogger(__name__)

KEEPALIVE_EVERY = 3.0
ACK_EVERY = 256 << 10
STDIN_WINDOW = 1 << 20
TOTAL_WINDOW = 64 << 20  # output in flight across all nodes of one run
NODE_WINDOW = 16 << 20


def window_for(n_nodes: int) -> int:
    """Per-node output credit: generous for one node, bounded in total for many."""
    return max(64 << 10, min(NODE_WINDOW, TOTAL_WINDOW // max(1, n_nodes)))


@dataclass(slots=True)
class Forward:
    """An agent's ``Output`` event, checked but kept as the msgpack frame it came in: the
    WebSocket sends it on as is (the frames are the same struct), no decode and re-encode."""

    node: str
    size: int  # bytes of output data in it
    frame: bytes


# Gets the events in order, all those waiting at once (at most SINK_BATCH).
EventSink = Callable[[list[m.RunEvent | Forward]], Awaitable[None]]
SINK_BATCH = 512


@dataclass(frozen=True, slots=True)
class Roll:
    """How a run goes through its nodes: all at once (the default), or in slices of
    ``batch`` nodes (``percent`` of them), with at most ``fanout`` running at a time."""

    batch: int = 0
    percent: int = 0
    fanout: int = 0
    keep_going: bool = False

    @property
    def rolling(self) -> bool:
        return bool(self.batch or self.percent or self.fanout)

    def slices(self, nodes: list[str]) -> list[list[str]]:
        size = self.batch or (-(-len(nodes) * self.percent // 100) if self.percent else 0)
        size = max(1, size) if size else len(nodes) or 1
        return [nodes[i:i + size] for i in range(0, len(nodes), size)]


def _failed(ev: m.Exit) -> bool:
    return ev.code != 0 or ev.signal is not None or ev.timed_out


class FanoutRun:
    def __init__(self, nc: NatsClient, nodes: list[str], spec: m.RunSpec,
                 sink: EventSink, down: set[str] | None = None,
                 connect_timeout: float = 5.0,
                 node_down: Callable[[str], bool] | None = None,
                 roll: Roll | None = None,
                 groups: list[tuple[str | None, list[str]]] | None = None) -> None:
        self.nc = nc
        self.run_id = secrets.token_hex(8)
        self.nodes = nodes
        self.spec = spec
        self.sink = sink
        self.down = down or set()
        self.connect_timeout = connect_timeout
        self.node_down = node_down
        # (lead, nodes): one batch request per lead, one plain request per node without one.
        self.groups = groups if groups is not None else [(None, [n]) for n in nodes]
        self._unanswered = {n for n in nodes if n not in self.down}
        self._batched: set[str] = set()  # nodes asked through a batch
        self._lead_of: dict[str, str] = {}  # a batched node -> the lead that reports for it
        self._control_to: list[str] = []  # where control frames go: leads and lone nodes
        self.window = window_for(len(nodes))
        self.roll = roll or Roll()
        self.failed: set[str] = set()
        self._done: dict[str, asyncio.Event] = {}
        self._halt = ""  # why a rolling run starts no more nodes
        self.live: set[str] = set()  # accepted and not yet exited
        self.finished: set[str] = set()
        self.all_finished = asyncio.Event()
        self.all_replied = asyncio.Event()
        self._consumed: dict[str, int] = {}
        self._acked: dict[str, int] = {}
        self._stdin_sent = 0
        self._stdin_written: dict[str, int] = {}
        self._stdin_progress = asyncio.Event()
        self._subs: list[Subscription] = []
        self._keepalive: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[m.RunEvent | Forward | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._asker: asyncio.Task[None] | None = None
        reuse_heap_for_bulk_io()

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        self._subs.append(await self.nc.subscribe(subjects.run_events(self.run_id),
                                                  cb=self._on_event_msg))
        if self.spec.stdin:
            self._subs.append(await self.nc.subscribe(subjects.run_stdin_ack(self.run_id),
                                                      cb=self._on_stdin_ack))
        self._pump = asyncio.create_task(self._pump_events())
        self._keepalive = asyncio.create_task(self._keepalive_loop())
        request = m.pack(m.RunRequest(run_id=self.run_id, spec=self.spec, window=self.window))
        for node in self.nodes:
            if node in self.down:
                self._emit(m.Unreachable(node=node, reason="node is down (no heartbeat)"))
                self._finish(node)
        self._asker = asyncio.create_task(self._ask_all(request))

    async def _ask_all(self, request: bytes) -> None:
        todo = [n for n in self.nodes if n not in self.down]
        try:
            if not self.roll.rolling:
                await asyncio.gather(*self._grouped_asks(request))
            else:  # slice by slice, node by node
                await self._roll(todo, request)
        finally:
            # A batch's nodes answer later, by their events (``_answered``).
            if not self._batched or not self._unanswered:
                self.all_replied.set()

    def _grouped_asks(self, request: bytes) -> list[Awaitable[None]]:
        asks: list[Awaitable[None]] = []
        for lead, members in self.groups:
            up = [n for n in members if n not in self.down]
            if lead is not None and len(up) > 1:
                asks.append(self._ask_batch(lead, up))
            else:
                asks += [self._ask(n, request) for n in up]
        return asks

    def _answered(self, node: str) -> None:
        """``node`` has said accepted, refused or exited (or was given up on)."""
        self._unanswered.discard(node)
        if not self._unanswered:
            self.all_replied.set()

    async def _ask_batch(self, lead: str, nodes: list[str]) -> None:
        self._batched.update(nodes)
        self._lead_of.update(dict.fromkeys(nodes, lead))
        self._control_to.append(lead)
        batch = m.RunBatch(run_id=self.run_id, spec=self.spec, nodes=nodes, window=self.window)
        reason = ""
        try:
            data = await rpc.request(self.nc, subjects.agent_runs(lead), m.pack(batch),
                                     self.connect_timeout)
            ack = m.unpack(data, m.RunBatchAck)
            reason = ack.reason
        except NoResponder:
            reason = "no agent is serving this node"
        except RemoteTimeout:
            reason = f"no answer in {self.connect_timeout:g}s"
        except msgspec.DecodeError as e:
            reason = f"bad answer from agent: {e}"
        except Exception as e:  # connection closed under us
            reason = f"request failed: {e}"
        refused = set(nodes) if reason else set(ack.refused)
        for node in nodes:
            if node in refused:
                self._emit(m.Unreachable(node=node, reason=reason or
                                         f"the agent of {lead} does not serve it (any more)"))
                self._finish(node, failed=True)
                self._answered(node)
            elif node not in self.finished:  # started or not, it is the agent's now
                self.live.add(node)

    async def _roll(self, todo: list[str], request: bytes) -> None:
        """Slices one after another (each finished before the next), at most ``fanout``
        nodes running at once; after a slice with a failure the rest is skipped."""
        for node in todo:
            self._done[node] = asyncio.Event()
        width = self.roll.fanout or len(todo)
        gate = asyncio.Semaphore(width)

        async def one(node: str) -> None:
            async with gate:
                if self._halt:
                    self._skip(node, self._halt)
                    return
                await self._ask(node, request)
                await self._done[node].wait()

        slices = self.roll.slices(todo)
        for i, chunk in enumerate(slices):
            if self._halt:
                for node in chunk:
                    self._skip(node, self._halt)
                continue
            await asyncio.gather(*(one(n) for n in chunk))
            bad = self.failed.intersection(chunk)
            if bad and not self.roll.keep_going and i + 1 < len(slices) and not self._halt:
                self._halt = (f"not run (slice {i + 1} of {len(slices)} failed on"
                              f" {NodeSet(bad)}; --keep-going rolls on)")

    def _skip(self, node: str, reason: str) -> None:
        self._emit(m.Skipped(node=node, reason=reason))
        self._finish(node)

    async def _ask(self, node: str, request: bytes) -> None:
        reply: m.RunAccepted | m.RunRefused | m.Exit | m.Unreachable
        self._control_to.append(node)
        try:
            data = await rpc.request(self.nc, subjects.agent_run(node), request,
                                     self.connect_timeout)
            reply = m.unpack_run_reply(data)
        except NoResponder:
            reply = m.Unreachable(node=node, reason="no agent is serving this node")
        except RemoteTimeout:
            reply = m.Unreachable(node=node, reason=f"no answer in {self.connect_timeout:g}s")
        except msgspec.DecodeError as e:
            reply = m.Unreachable(node=node, reason=f"bad answer from agent: {e}")
        except Exception as e:  # connection closed under us
            reply = m.Unreachable(node=node, reason=f"request failed: {e}")
        if isinstance(reply, m.RunAccepted):
            if node not in self.finished:  # its exit may have overtaken the reply
                self.live.add(node)
            self._emit(m.Started(node=node, pid=reply.pid))
        elif isinstance(reply, m.RunRefused):
            self._emit(m.Unreachable(node=node, reason=reply.reason))
            self._finish(node, failed=True)
        else:
            self._emit(reply)
            self._finish(node, failed=isinstance(reply, m.Unreachable) or _failed(reply))
        self._answered(node)

    # ------------------------------------------------------------------ events

    def _emit(self, ev: m.RunEvent | Forward) -> None:
        self._events.put_nowait(ev)

    async def _on_event_msg(self, msg: Msg) -> None:
        try:
            ev = m.unpack_agent_event_frame(msg.data)
        except msgspec.DecodeError:
            log.warning("run %s: undecodable event on %s", self.run_id, msg.subject)
            return
        # Who speaks: the subject's last token, which only that node's credential may
        # publish (node identities). A node speaks for itself; a lead for its batch.
        speaker = msg.subject.rpartition(".")[2]
        if isinstance(ev, m.RunBatchStarted):
            for node, pid in ev.started:
                if self._lead_of.get(node) == speaker and node in self._unanswered:
                    self._emit(m.Started(node=node, pid=pid))
                    self._answered(node)
            return
        if isinstance(ev, m.RunBatchExited):
            for exit_ in ev.exits:
                if self._lead_of.get(exit_.node) == speaker:
                    self._on_exit(exit_)
            return
        if ev.node != speaker:
            log.warning("run %s: %s sent an event for node %s; ignored", self.run_id, speaker,
                        ev.node)
            return
        if isinstance(ev, m.Exit):
            self._on_exit(ev)
            return
        size = ev.size
        if size is None:
            log.warning("run %s: output that is not bytes on %s", self.run_id, msg.subject)
            return
        self._emit(Forward(ev.node, size, msg.data))

    def _on_exit(self, ev: m.Exit) -> None:
        self._emit(ev)
        if ev.node in self._batched:  # for one that never reported a start: it could not
            self._answered(ev.node)

    async def _pump_events(self) -> None:
        """Hand events to the sink in order, all those waiting at once; acknowledge output
        once the sink took it."""
        ended = False
        while not ended:
            first = await self._events.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < SINK_BATCH and not self._events.empty():
                ev = self._events.get_nowait()
                if ev is None:
                    ended = True
                    break
                batch.append(ev)
            await self.sink(batch)
            for ev in batch:
                if isinstance(ev, Forward):
                    done = self._consumed.get(ev.node, 0) + ev.size
                    self._consumed[ev.node] = done
                    if done - self._acked.get(ev.node, 0) >= min(ACK_EVERY, self.window // 2):
                        self._acked[ev.node] = done
                        await self.nc.publish(subjects.run_output_ack(self.run_id, ev.node),
                                              m.pack(m.OutputAck(consumed=done)))
                elif isinstance(ev, m.Exit):
                    self._finish(ev.node, failed=_failed(ev))

    def _finish(self, node: str, failed: bool = False) -> None:
        self.live.discard(node)
        self.finished.add(node)
        if failed:
            self.failed.add(node)
        done = self._done.get(node)
        if done is not None:
            done.set()
        self._stdin_progress.set()
        if len(self.finished) == len(self.nodes):
            self.all_finished.set()

    # ------------------------------------------------------------------ control

    async def _control(self, frame: m.RunControl) -> None:
        data = m.pack(frame)
        for to in self._control_to:  # each batch's lead, each node asked alone
            await self.nc.publish(subjects.run_control(self.run_id, to), data)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_EVERY)
            await self._control(m.Keepalive())
            if self.node_down is None:
                continue
            # A node that dies mid-run sends no exit: name it rather than wait forever.
            for node in [n for n in self.live if self.node_down(n)]:
                self._emit(m.Unreachable(node=node, reason="node went down during the run"))
                self._finish(node, failed=True)
                self._answered(node)

    async def _on_stdin_ack(self, msg: Msg) -> None:
        try:
            ack = m.unpack(msg.data, m.StdinAck)
        except msgspec.DecodeError:
            return
        self._stdin_written[ack.node] = max(self._stdin_written.get(ack.node, 0), ack.written)
        self._stdin_progress.set()

    def _stdin_behind(self) -> int:
        live = [self._stdin_written.get(n, 0) for n in self.live]
        return self._stdin_sent - min(live) if live else 0

    async def send_stdin(self, data: bytes, eof: bool = False) -> None:
        """Broadcast stdin; waits while the slowest live node is a window behind."""
        await self.all_replied.wait()
        while self._stdin_behind() >= STDIN_WINDOW and not self.all_finished.is_set():
            self._stdin_progress.clear()
            await self._stdin_progress.wait()
        frame = m.StdinData(offset=self._stdin_sent, data=data, eof=eof)
        self._stdin_sent += len(data)
        await self._control(frame)

    async def resize(self, cols: int, rows: int) -> None:
        await self._control(m.Resize(cols=cols, rows=rows))

    async def signal(self, signum: int) -> None:
        self._halt = self._halt or f"not run (interrupted by signal {signum})"
        await self._control(m.SignalRun(signum=signum))

    async def cancel(self, reason: str = "cancelled by the client") -> None:
        self._halt = self._halt or f"not run ({reason})"
        await self._control(m.Cancel(reason=reason))

    async def wait(self) -> None:
        """Until every node has finished and every event was handed to the sink."""
        await self.all_finished.wait()
        await self.all_replied.wait()
        self._events.put_nowait(None)
        if self._pump is not None:
            await self._pump

    async def close(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        if self._asker is not None and not self._asker.done():
            self._asker.cancel()  # a rolling run still waiting on a slice
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
