"""Terminal sessions: keystroke-to-echo round trip, and how many live terminals one host holds.

Run from the repository root with `python -m bench.terminal` (bench.run runs it as one of its
EXTRA_BENCHMARKS). It starts a private `shoal up --agents 2 --capacity 200 --port 0` in a
temporary SHOAL_HOME, prints the rows as one JSON list on stdout and writes
bench/results/terminal.md and terminal.json. All traffic is to 127.0.0.1; the run stops itself
within its budget (BENCH_DEADLINE_S when set, else --budget).

terminal-echo: one `tty=True` session running `cat`, its pty left in the default cooked mode,
so the echo of a typed byte comes from the pty's line discipline (ECHO), not from `cat`, which
only sees whole lines. A WebSocket client (aiohttp) attached at
`/api/v1/sessions/{id}/attach?from=0` sends one byte as a binary frame and times until that
byte comes back in an output frame: browser -> controller -> NATS -> agent -> pty write, then
echo -> agent read -> JetStream -> controller -> WebSocket. Every 64 bytes it sends a carriage
return and waits (untimed) for `cat` to print the line back, so the pty's line buffer never
fills. Warm-up keystrokes are dropped.

terminal-load-N: N `tty=True` sessions of bash, each printing a ~40-byte line every 100 ms
(`read -t 0.1` on a private pipe is the sleep, so there is no `sleep` process forked per line),
each with its own attached WebSocket reading its output. The ramp goes 50, 100, 200, 300
sessions (stopping at the first level that fails or when the time budget runs short); at each
level it holds for --hold seconds and records the sessions created and attached, output
received (bytes/s and lines/s per session, 10 expected), the keystroke round trip p99 on 10 of
the sessions (same echo path, a `~` typed every ~60 ms; bash never reads its stdin, the echo is
the line discipline's), the output delivery delay (each line carries bash's $EPOCHREALTIME;
the client subtracts it from its clock on arrival: same host, same clock), and the CPU (% of one
core) and RSS of the `shoal up` process (the controller and both agents: one Python process), of
its nats-server, of the session processes and of this client.

The bench client, controller, agents, NATS and the sessions share this machine's CPUs; the load
average is printed with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import RESULTS_DIR, Deadline, Row, ShoalFleet, log, shoal_fleet, shoal_problem
from bench.sessions import (
    TOOL,
    Usage,
    budget_from_env,
    fleet_client,
    latency_row,
    ms,
    pct,
    run_main,
    shoal_bin,
)
from shoal.client.aio import Client

ECHO_MODE = "cat on a cooked-mode pty: the echo comes from the pty line discipline"
# A line every 100 ms without forking `sleep`: `read -t` on a pipe nobody writes to.
# Each line carries bash's $EPOCHREALTIME, so the client can time output delivery too.
LOOP = (
    "exec 9<> <(:); while :; do "
    'printf "tick %s abcdefghijklmnop\\n" "$EPOCHREALTIME"; read -t 0.1 -u 9; done'
)
TICK = re.compile(rb"tick (\d+\.\d+) ")
MARK = b"~"  # typed into loaded sessions; never in their own output
STOP_RESERVE_S = 25.0  # kept at the end for closing the WebSockets and stopping the fleet
SETTLE_S = 2.0  # after a level's ramp, before its hold
LEVEL_MARGIN_S = 45.0  # a level starts only with its hold plus this left


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(
        prog="python -m bench.terminal", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--samples", type=int, default=2500, help="timed keystrokes (idle)")
    parser.add_argument("--warmup", type=int, default=200, help="uncounted keystrokes first")
    parser.add_argument(
        "--levels",
        type=ints,
        default=[50, 100, 200, 300],
        help="concurrent sessions to ramp through",
    )
    parser.add_argument("--hold", type=float, default=10.0, help="seconds at each level")
    parser.add_argument("--probes", type=int, default=10, help="sessions timed under load")
    parser.add_argument("--capacity", type=int, default=200, help="sessions per agent")
    parser.add_argument(
        "--budget",
        type=float,
        default=budget_from_env(170.0),
        help="overall seconds (default: BENCH_DEADLINE_S less 20, max 170)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def attach_url(client: Client, sid: str) -> str:
    return f"{client.url}/api/v1/sessions/{sid}/attach"


def ws_session(client: Client) -> aiohttp.ClientSession:
    """An HTTP session for the WebSockets only: each one holds a connection for as long as it
    is open, so they must not share Client.http's pool (100 connections) with API calls."""
    return aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {client.token}"},
        connector=aiohttp.TCPConnector(limit=0, family=socket.AF_INET),
    )


async def wait_running(client: Client, ids: Sequence[str], timeout: float) -> dict[str, str]:
    """Poll the session list until every id is running; returns id -> state of the rest."""
    wanted = set(ids)
    end = time.monotonic() + timeout
    while True:
        states = {r.id: r.state for r in await client.sessions() if r.id in wanted}
        rest = {sid: states.get(sid, "missing") for sid in wanted if states.get(sid) != "running"}
        if not rest or time.monotonic() > end:
            return rest
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- keystroke echo, idle


async def receive_until(ws: aiohttp.ClientWebSocketResponse, done: Any, timeout: float) -> float:
    """Read output frames until done(buffer) holds; returns perf_counter() at that frame."""
    buf = bytearray()
    end = time.perf_counter() + timeout
    while True:
        left = end - time.perf_counter()
        if left <= 0:
            raise TimeoutError(f"no echo within {timeout:g}s (got {bytes(buf[-40:])!r})")
        msg = await ws.receive(timeout=left)
        now = time.perf_counter()
        if msg.type == aiohttp.WSMsgType.BINARY:
            buf += msg.data
            if done(buf):
                return now
        elif msg.type == aiohttp.WSMsgType.TEXT:
            frame = json.loads(msg.data)
            if frame.get("t") in ("exit", "error"):
                raise RuntimeError(f"session ended: {frame}")
        elif msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        ):
            raise RuntimeError(f"WebSocket closed: {msg.type.name}")


async def echo_idle(
    client: Client,
    wss: aiohttp.ClientSession,
    args: argparse.Namespace,
    deadline: Deadline,
    rows: list[Row],
) -> None:
    record = await client.create_session({"command": ["cat"], "tty": True})
    left = await wait_running(client, [record.id], 15)
    if left:
        rows.append(
            Row("terminal-echo", TOOL, 1, status="failed", note=f"cat session not running: {left}")
        )
        return
    samples: list[float] = []
    error = ""
    letters = b"abcdefghijklmnopqrstuvwxyz"
    async with wss.ws_connect(attach_url(client, record.id), params={"from": "0"}) as ws:
        hello = await ws.receive(timeout=10)
        if hello.type != aiohttp.WSMsgType.TEXT or json.loads(hello.data).get("t") != "hello":
            raise RuntimeError(f"expected a hello frame, got {hello.type.name} {hello.data!r}")
        line = bytearray()
        try:
            for i in range(args.warmup + args.samples):
                if deadline.near(min(LEVEL_MARGIN_S + args.hold + 10, deadline.budget_s / 2)):
                    error = f"stopped after {len(samples)} samples: time budget"
                    break
                key = letters[i % 26 : i % 26 + 1]
                t0 = time.perf_counter()
                await ws.send_bytes(key)
                t1 = await receive_until(ws, lambda buf, key=key: key in buf, 5.0)
                if i >= args.warmup:
                    samples.append(t1 - t0)
                line += key
                if len(line) >= 64:
                    expect = bytes(line) + b"\r\n"
                    await ws.send_bytes(b"\r")
                    await receive_until(ws, lambda buf, e=expect: buf.endswith(e), 5.0)
                    line.clear()
        except (TimeoutError, RuntimeError) as exc:
            error = f"after {len(samples)} samples: {exc}"
    await client.kill(record.id)
    row = latency_row("terminal-echo", 1, samples, mode=ECHO_MODE, sessions=1)
    row.extra["echo_goal_met"] = goal_met(row)
    if error:
        row.note = error[:300]
        if samples:
            row.status = "partial"
    rows.append(row)
    log(
        f"echo: {len(samples)} samples, p50 {row.extra.get('p50_ms')} ms, "
        f"p90 {row.extra.get('p90_ms')} ms, p99 {row.extra.get('p99_ms')} ms, "
        f"max {row.extra.get('max_ms')} ms {error}"
    )


def goal_met(row: Row) -> bool | None:
    """The issue's keystroke goal: echo p50 <= 2 ms and p99 <= 10 ms (None: no samples)."""
    p50, p99 = row.extra.get("p50_ms"), row.extra.get("p99_ms")
    return None if p50 is None or p99 is None else p50 <= 2.0 and p99 <= 10.0


# ---------------------------------------------------------------- many terminals under load


class Term:
    """One attached terminal: counts output, and times MARK echoes on request."""

    def __init__(self, sid: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.sid = sid
        self.ws = ws
        self.bytes = 0
        self.lines = 0
        self.ended = ""
        self.waiter: asyncio.Future[float] | None = None
        self.lags: list[float] | None = None  # output delivery delays, when collecting
        self._partial = b""
        self.task = asyncio.create_task(self._read())

    def _lines(self, data: bytes) -> None:
        """Delivery delay of each complete tick line: now minus the time bash printed it."""
        now = time.time()
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-200:]
        if self.lags is not None:
            for line in lines:
                found = TICK.search(line)  # a typed MARK may land inside a line: search
                if found:
                    self.lags.append(now - float(found.group(1)))

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    data = msg.data
                    self.bytes += len(data)
                    self.lines += data.count(b"\n")
                    self._lines(data)
                    waiter = self.waiter
                    if waiter is not None and MARK in data and not waiter.done():
                        waiter.set_result(time.perf_counter())
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    frame = json.loads(msg.data)
                    if frame.get("t") in ("exit", "error"):
                        self.ended = f"{frame.get('t')}: {frame}"
                        break
            self.ended = self.ended or "WebSocket closed"
        except Exception as exc:
            self.ended = f"{type(exc).__name__}: {exc}"

    async def rtt(self, timeout: float = 5.0) -> float:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiter = fut
        t0 = time.perf_counter()
        try:
            await self.ws.send_bytes(MARK)
            return await asyncio.wait_for(fut, timeout) - t0
        finally:
            self.waiter = None

    async def close(self) -> None:
        await self.ws.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def add_sessions(
    client: Client, wss: aiohttp.ClientSession, terms: list[Term], target: int, errors: list[str]
) -> int:
    """Create and attach sessions until `terms` has `target`; returns how many were created."""
    need = target - len(terms)
    sem = asyncio.Semaphore(25)

    async def create() -> str | None:
        async with sem:
            try:
                record = await client.create_session(
                    {"command": ["bash", "--norc", "--noprofile", "-c", LOOP], "tty": True}
                )
            except Exception as exc:
                errors.append(f"create: {type(exc).__name__}: {exc}")
                return None
            if record.state in ("failed", "exited", "killed", "lost"):
                errors.append(f"create: {record.state}: {record.reason}")
                return None
            return record.id

    ids = [sid for sid in await asyncio.gather(*(create() for _ in range(need))) if sid]
    left = await wait_running(client, ids, 30)
    for sid, state in left.items():
        errors.append(f"{sid} {state} after 30s")
    running = [sid for sid in ids if sid not in left]

    async def attach(sid: str) -> None:
        async with sem:
            try:
                ws = await wss.ws_connect(attach_url(client, sid), params={"from": "0"})
            except Exception as exc:
                errors.append(f"attach {sid}: {type(exc).__name__}: {exc}")
                return
            terms.append(Term(sid, ws))

    await asyncio.gather(*(attach(sid) for sid in running))
    return len(ids)


async def probe(term: Term, until: float, out: list[float], errors: list[str]) -> None:
    """Type MARK every ~60 ms until `until`, timing each echo (the first 2 dropped)."""
    i = 0
    while time.perf_counter() < until and not term.ended:
        try:
            dt = await term.rtt()
        except TimeoutError:
            errors.append(f"{term.sid}: no echo within 5s")
            return
        if i >= 2:
            out.append(dt)
        i += 1
        await asyncio.sleep(0.06)


async def load_ramp(
    client: Client,
    wss: aiohttp.ClientSession,
    fleet: ShoalFleet,
    args: argparse.Namespace,
    deadline: Deadline,
    rows: list[Row],
) -> None:
    terms: list[Term] = []
    usage = Usage(fleet)
    current: int | None = None  # the level under way, for a row if it is cut short
    try:
        for level in args.levels:
            current = level
            if deadline.near(LEVEL_MARGIN_S + args.hold):
                rows.append(
                    Row(f"terminal-load-{level}", TOOL, level, status="skipped", note="time budget")
                )
                log(f"level {level}: skipped, {deadline.remaining():.0f}s left")
                break
            errors: list[str] = []
            t0 = time.perf_counter()
            created = len(terms) + await add_sessions(client, wss, terms, level, errors)
            ramp_s = time.perf_counter() - t0
            log(f"level {level}: {created} created, {len(terms)} attached in {ramp_s:.1f}s")
            await asyncio.sleep(SETTLE_S)  # the ramp's backlog goes by before the hold
            bytes0 = sum(t.bytes for t in terms)
            lines0 = sum(t.lines for t in terms)
            for t in terms:
                t.lags = []
            usage.start()
            until = time.perf_counter() + args.hold
            rtts: list[float] = []
            await asyncio.gather(*(probe(t, until, rtts, errors) for t in terms[: args.probes]))
            await asyncio.sleep(max(0.0, until - time.perf_counter()))
            stats = usage.stop()
            lags = [lag for t in terms for lag in (t.lags or ())]
            for t in terms:
                t.lags = None
            if lags:
                stats.update(
                    out_lag_p50_ms=ms(pct(lags, 50)),
                    out_lag_p99_ms=ms(pct(lags, 99)),
                    out_lag_max_ms=ms(max(lags)),
                    out_lines=len(lags),
                )
            wall = args.hold
            out_bps = (sum(t.bytes for t in terms) - bytes0) / wall
            lines_per_session = (sum(t.lines for t in terms) - lines0) / wall / max(1, len(terms))
            ended = [t for t in terms if t.ended]
            if ended:
                errors.append(f"{len(ended)} terminal(s) ended: {ended[0].ended[:150]}")
            row = latency_row(
                f"terminal-load-{level}",
                level,
                rtts,
                sessions=level,
                sessions_ok=created,
                attached=len(terms) - len(ended),
                out_bytes_per_s=round(out_bps),
                lines_per_s_per_session=round(lines_per_session, 2),
                ramp_s=round(ramp_s, 2),
                hold_s=wall,
                rtt_sessions=min(args.probes, len(terms)),
                **stats,
            )
            # A level fails when sessions are missing, output stalls (< 80% of a line every
            # 100 ms) or keystrokes went unanswered.
            failed = (
                created < level
                or len(terms) - len(ended) < level
                or lines_per_session < 8.0
                or any("no echo" in e for e in errors)
            )
            row.extra["echo_goal_met"] = goal_met(row)
            if failed:
                row.status = "failed"
            if errors:
                row.note = f"{len(errors)} problem(s): {errors[0][:200]}"
            rows.append(row)
            current = None
            log(
                f"level {level}: {row.status}; out {out_bps / 1024:.1f} KiB/s, "
                f"{lines_per_session:.2f} lines/s/session, rtt p50 {row.extra.get('p50_ms')} "
                f"p99 {row.extra.get('p99_ms')} ms ({len(rtts)}), shoal up cpu "
                f"{stats['ctl_cpu_pct']}% rss {stats['ctl_rss_mib']} MiB, nats cpu "
                f"{stats['nats_cpu_pct']}%, sessions cpu {stats['sessions_cpu_pct']}%, host cpu "
                f"{stats['host_cpu_pct']}%, output lag p50 {stats.get('out_lag_p50_ms')} p99 "
                f"{stats.get('out_lag_p99_ms')} ms"
            )
            problem = fleet.problem()
            if failed or problem:
                if problem:
                    row.status, row.note = "failed", problem[:300]
                break
    except (Exception, asyncio.CancelledError) as exc:
        if current is not None:
            why = (
                "time budget ran out"
                if isinstance(exc, asyncio.CancelledError)
                else f"{type(exc).__name__}: {exc}"
            )
            rows.append(
                Row(
                    f"terminal-load-{current}",
                    TOOL,
                    current,
                    status="failed",
                    note=f"cut short after {len(terms)} attached: {why}"[:300],
                )
            )
        raise
    finally:
        await asyncio.gather(*(t.close() for t in terms), return_exceptions=True)


def bench(args: argparse.Namespace, root: Path, deadline: Deadline, rows: list[Row]) -> None:
    shoal = shoal_bin()
    problem = shoal_problem(shoal)
    if problem or shoal is None:
        rows.append(Row("terminal-echo", TOOL, 1, status="skipped", note=problem or ""))
        return
    with shoal_fleet(shoal, root, 2, deadline, capacity=args.capacity) as fleet:

        async def go() -> None:
            # Whatever hangs, leave time to close the WebSockets and stop the fleet.
            async with asyncio.timeout(max(5.0, deadline.remaining() - STOP_RESERVE_S)):
                async with fleet_client(fleet) as client, ws_session(client) as wss:
                    await echo_idle(client, wss, args, deadline, rows)
                    await load_ramp(client, wss, fleet, args, deadline, rows)

        try:
            asyncio.run(go())
        except TimeoutError:
            log("time budget ran out; results so far are kept")
            if not any(r.workload == "terminal-echo" for r in rows):
                rows.append(Row("terminal-echo", TOOL, 1, status="failed", note="time budget"))
        log("stopping the fleet")


COLUMNS = (
    "workload",
    "sessions_ok",
    "attached",
    "runs",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "echo_goal_met",
    "out_lag_p50_ms",
    "out_lag_p99_ms",
    "out_bytes_per_s",
    "lines_per_s_per_session",
    "ctl_cpu_pct",
    "ctl_rss_mib",
    "nats_cpu_pct",
    "nats_rss_mib",
    "sessions_cpu_pct",
    "bench_cpu_pct",
    "host_cpu_pct",
    "status",
)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    notes = (
        f"Fleet: `shoal up --agents 2 --capacity {args.capacity} --port 0` (controller and both "
        "agents in one Python process, plus its nats-server) in a temporary SHOAL_HOME; the "
        "client is aiohttp WebSockets in one process on the same host.\n\n"
        f"- terminal-echo: {ECHO_MODE}. One byte per binary WebSocket frame, timed until it "
        f"comes back; {args.warmup} warm-up keystrokes dropped, `runs` = timed keystrokes. "
        "Goal (`echo_goal_met`): p50 <= 2 ms, p99 <= 10 ms.\n"
        "- terminal-load-N: N tty sessions of bash each printing a ~40-byte line every 100 ms, "
        f"one WebSocket attached to each; held {args.hold:g} s per level. p50..max = keystroke "
        f"echo round trip on {args.probes} of them during the hold (`runs` samples); "
        "`out_lag_*` = delay from bash printing a line (its $EPOCHREALTIME) to the client "
        "receiving it; `lines_per_s_per_session` should be ~10 (more means a backlog was "
        "still draining); CPU is % of one core over the hold (`ctl` = the `shoal up` process: "
        "controller + agents; `sessions` = the bash loops; `bench` = this client; `host` = all "
        "CPUs of the machine, other users included). Goal: 200 concurrent sessions.\n"
    )
    return run_main(
        "terminal",
        "shoal terminals: keystroke echo and concurrent sessions",
        COLUMNS,
        notes,
        lambda root, deadline, rows: bench(args, root, deadline, rows),
        args.budget,
        args.out,
        "shoal-terminal-",
    )


if __name__ == "__main__":
    sys.exit(main())
