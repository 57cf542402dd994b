"""``shoal session ...``, ``shoal logs``, ``shoal launch``: long-lived sessions from the CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

from ..config import parse_env, parse_labels
from ..errors import ShoalError, Unavailable
from ..logic.lines import LineSplitter
from ..wire import messages as m
from .main import arun, client_from, client_messages, fail, main

# A controller that answers 503 (its view of the fleet is catching up after a NATS fault)
# created nothing: `session create` asks again for this long before it gives up.
CREATE_RETRY_FOR = 30.0

if TYPE_CHECKING:
    from ..client.aio import Client

DETACH_KEY = b"\x1d"  # Ctrl-]
ATTACH_REPLAY = 64 << 10  # bytes of recent output shown on attach


def _record_line(r: m.SessionRecord) -> str:
    where = f"{r.node}" + (f" ports {','.join(map(str, r.ports))}" if r.ports else "")
    return f"{r.id}\t{r.state}\t{where or '-'}\t{r.reason}".rstrip()


def _print_records(records: list[m.SessionRecord], as_json: bool) -> None:
    if as_json:
        click.echo(m.to_json(records).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("ID", "NAME", "STATE", "NODE", "PORTS", "EXIT", "RESTARTS", "REASON"):
        table.add_column(col)
    for r in records:
        exit_ = str(r.exit_code) if r.exit_code is not None else \
            f"sig {r.signal}" if r.signal else "-"
        table.add_row(r.id, r.name, r.state, r.node or "-",
                      ",".join(map(str, r.ports)) or "-", exit_, str(r.restarts), r.reason or "")
    Console().print(table)


@main.group()
def session() -> None:
    """Long-lived sessions: create, list, show, logs, attach, signal, kill, rm."""


@session.command("create", context_settings={"allow_interspersed_args": False})
@click.option("--id", "sid", help="Idempotency key: creating the same id twice returns the first.")
@click.option("--name", default="", help="A name for people.")
@click.option("--shell", default=None, help="Run this string with /bin/sh -c.")
@click.option("-t", "--tty", is_flag=True, help="Give it a terminal (attach to use it).")
@click.option("--stdin", is_flag=True, help="Keep stdin open for attached clients.")
@click.option("--restart", type=click.Choice(["never", "on-failure", "always"]), default="never",
              show_default=True)
@click.option("--timeout", type=float, help="End it after S seconds.")
@click.option("--idle-timeout", type=float, help="End it after S seconds without I/O.")
@click.option("--detach-timeout", type=float, help="End it S seconds after the last client left.")
@click.option("--ports", type=click.IntRange(0, 64), default=0, help="Ports to allocate ($PORT).")
@click.option("--node", default=None, help="Pin to this node.")
@click.option("-s", "--selector", multiple=True, help="Only nodes with this key=value label.")
@click.option("--binpack", is_flag=True, help="Fill nodes up instead of spreading.")
@click.option("-e", "--env", multiple=True, help="NAME=VALUE (repeatable).")
@click.option("--cwd", default=None)
@click.option("--user", default="agent", show_default=True,
              help="agent (the agent's user), ephemeral (a throwaway user) or NAME (a user "
                   "the node's agent allows: run_as in agent.toml).")
@click.option("-l", "--label", "labels", multiple=True, help="key=value on the session.")
@click.option("--cpu-seconds", type=int)
@click.option("--memory-mb", type=int)
@click.option("--max-procs", type=int)
@click.option("--max-files", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def create(ctx: click.Context, sid: str | None, name: str, shell: str | None, tty: bool,
           stdin: bool, restart: str, timeout: float | None, idle_timeout: float | None,
           detach_timeout: float | None, ports: int, node: str | None,
           selector: tuple[str, ...], binpack: bool, env: tuple[str, ...], cwd: str | None,
           user: str, labels: tuple[str, ...], cpu_seconds: int | None, memory_mb: int | None,
           max_procs: int | None, max_files: int | None, as_json: bool,
           argv: tuple[str, ...]) -> None:
    """Start a session on the best node; prints its id."""
    if bool(argv) == bool(shell):
        fail("give a command after -- (argv) or --shell 'string', not both", 2)
    try:
        body: dict[str, Any] = {
            "id": sid, "name": name, "command": list(argv) or None, "shell": shell, "tty": tty,
            "stdin": stdin, "restart": restart, "timeout": timeout,
            "idle_timeout": idle_timeout, "detach_timeout": detach_timeout, "ports": ports,
            "node": node, "selector": parse_labels(selector),
            "strategy": "binpack" if binpack else "spread",
            "env": parse_env(env), "cwd": cwd, "user": user,
            "labels": parse_labels(labels),
            "limits": {"cpu_seconds": cpu_seconds, "memory_mb": memory_mb,
                       "processes": max_procs, "open_files": max_files},
        }
        spec = msgspec.convert(body, m.SessionSpec)
    except msgspec.ValidationError as e:
        fail(f"bad session spec: {e}", 2)
    except ShoalError as e:
        fail(e.message, 2)

    async def go() -> m.SessionRecord:
        async with client_from(ctx) as c:
            deadline = time.monotonic() + CREATE_RETRY_FOR
            while True:
                try:
                    return await c.create_session(spec)
                except Unavailable as e:  # nothing was created: safe to ask again
                    if time.monotonic() + e.retry_after > deadline:
                        raise
                    click.echo(f"shoal: {e.message}", err=True)
                    await asyncio.sleep(e.retry_after)

    record = arun(go())
    if as_json:
        click.echo(m.to_json(record).decode())
    else:
        click.echo(record.id)
    if record.state == "failed":
        click.echo(f"shoal: session {record.id} failed: {record.reason}", err=True)
        sys.exit(1)


@session.command("list")
@click.option("--state", default=None, help="pending, running, exited, ... or live.")
@click.option("--node", default=None)
@click.option("--name", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_(ctx: click.Context, state: str | None, node: str | None, name: str | None,
          as_json: bool) -> None:
    """List sessions."""
    async def go() -> list[m.SessionRecord]:
        async with client_from(ctx) as c:
            return await c.sessions(state, node, name)

    _print_records(arun(go()), as_json)


@session.command("show")
@click.argument("sid")
@click.pass_context
def show(ctx: click.Context, sid: str) -> None:
    """Show a session's record as JSON."""
    async def go() -> m.SessionRecord:
        async with client_from(ctx) as c:
            return await c.session(sid)

    click.echo(m.to_json(arun(go())).decode())


@session.command("signal")
@click.argument("sid")
@click.argument("sig", default="TERM")
@click.pass_context
def signal_(ctx: click.Context, sid: str, sig: str) -> None:
    """Send a signal (name or number) to a session's process group."""
    async def go() -> None:
        async with client_from(ctx) as c:
            await c.signal(sid, sig)

    arun(go())


@session.command("kill")
@click.argument("sids", nargs=-1, required=True)
@click.option("--wait", is_flag=True, help="Wait until each has ended.")
@click.pass_context
def kill(ctx: click.Context, sids: tuple[str, ...], wait: bool) -> None:
    """End sessions (SIGTERM, then SIGKILL after the agent's grace period)."""
    async def go() -> None:
        async with client_from(ctx) as c:
            for sid in sids:
                await c.kill(sid)
                if wait:
                    r = await c.wait(sid)
                    click.echo(_record_line(r))

    arun(go())


@session.command("rm")
@click.argument("sids", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, sids: tuple[str, ...]) -> None:
    """Remove sessions (ending them first) with their output."""
    async def go() -> None:
        async with client_from(ctx) as c:
            for sid in sids:
                await c.remove(sid)

    arun(go())


async def _logs(client: Client, sid: str, start: int, tail: int | None, follow: bool,
                until: str | None, skip_empty: bool) -> int:
    from ..client.aio import LogChunk, LogEnd, LogEof, LogTruncated

    out, err = sys.stdout.buffer, sys.stderr.buffer
    seen = b""  # the end of the output so far, to find --until across chunks
    needle = until.encode() if until else None
    splitters: dict[str, LineSplitter] = {}
    async for ev in client.logs(sid, start, follow, tail):
        if isinstance(ev, LogChunk):
            data = ev.data
            if skip_empty:
                lines = splitters.setdefault(ev.stream, LineSplitter()).feed(data)
                data = b"".join(ln for ln in lines if ln.strip())
            (err if ev.stream == "stderr" else out).write(data)
            (err if ev.stream == "stderr" else out).flush()
            if needle is not None:
                window = seen + ev.data
                if needle in window:
                    return 0
                seen = window[-len(needle):]
        elif isinstance(ev, LogTruncated):
            err.write(f"shoal: bytes {ev.start}-{ev.end} were dropped by the output cap\n"
                      .encode())
        elif isinstance(ev, LogEnd | LogEof):
            for stream, splitter in splitters.items():
                rest = splitter.flush()
                if rest and rest.strip():
                    (err if stream == "stderr" else out).write(rest)
        if isinstance(ev, LogEnd) and follow and ev.state != "exited":
            err.write(f"shoal: session {ev.state}: {ev.reason}\n".encode())
    return 1 if needle is not None else 0


@main.command("logs")
@click.argument("sid")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until it ends.")
@click.option("--from", "start", default=0, type=click.IntRange(min=0),
              help="Start at this byte offset.")
@click.option("--tail", type=click.IntRange(min=0), default=None,
              help="Start this many bytes before the end (instead of --from).")
@click.option("--until", default=None, help="Stop (exit 0) once this text appears.")
@click.option("--skip-empty", is_flag=True, help="Leave out blank lines.")
@click.pass_context
def logs(ctx: click.Context, sid: str, follow: bool, start: int, tail: int | None,
         until: str | None, skip_empty: bool) -> None:
    """Print a session's output (stdout to stdout, stderr to stderr), from anywhere.

    If the controller goes away, it reconnects by itself and goes on from the last byte it
    printed (for up to a minute; then it exits 1 saying where to resume with --from)."""
    client_messages()

    async def go() -> int:
        async with client_from(ctx) as c:
            return await _logs(c, sid, start, tail, follow, until, skip_empty)

    sys.exit(arun(go()))


session.add_command(logs)


@session.command("attach")
@click.argument("sid")
@click.option("--from", "start", default=None, type=click.IntRange(min=0),
              help="Replay output from this offset (default: the last 64 KiB).")
@click.pass_context
def attach(ctx: click.Context, sid: str, start: int | None) -> None:
    """Attach this terminal to a session (like tmux attach); Ctrl-] detaches."""
    from .run_cmd import raw_terminal, terminal_size

    if not sys.stdin.isatty():
        fail("attach needs a terminal on standard input", 2)

    async def go() -> int:
        import asyncio

        from ..errors import ConnectError

        loop = asyncio.get_running_loop()
        tail = ATTACH_REPLAY if start is None else None
        async with client_from(ctx) as c, c.attach(sid, start or 0, tail) as att:
            async def send(data: bytes) -> None:
                try:
                    await att.send(data)
                except ConnectError as e:
                    sys.stderr.write(f"\r\nshoal: {e.message}\r\n")

            async def resize() -> None:
                try:
                    await att.resize(*terminal_size())
                except ConnectError:
                    pass  # sent again after the reconnect

            await resize()
            loop.add_signal_handler(signal.SIGWINCH, lambda: asyncio.ensure_future(resize()))
            detached = asyncio.Event()

            def on_key() -> None:
                data = os.read(sys.stdin.fileno(), 4096)
                if DETACH_KEY in data:
                    detached.set()
                    return
                asyncio.ensure_future(send(data))

            loop.add_reader(sys.stdin.fileno(), on_key)

            async def output() -> None:
                async for item in att:
                    if isinstance(item, bytes):
                        sys.stdout.buffer.write(item)
                        sys.stdout.buffer.flush()
                    elif item.get("t") == "hello":
                        await resize()  # after a reconnect: the new socket needs the size

            out = asyncio.create_task(output())
            waiter = asyncio.create_task(detached.wait())
            await asyncio.wait([out, waiter], return_when=asyncio.FIRST_COMPLETED)
            loop.remove_reader(sys.stdin.fileno())
            waiter.cancel()
            if detached.is_set():
                out.cancel()
                sys.stderr.write(f"\r\nshoal: detached from {sid}\r\n")
                return 0
            out.result()  # the reconnecting gave up: its error, and exit 1
            return _attach_status(att.exit)

    client_messages(raw_terminal=True)
    with raw_terminal(sys.stdin.fileno()):
        status = arun(go())
    sys.exit(status)


def _attach_status(ex: dict[str, Any] | None) -> int:
    """Say how the session ended; the exit status mirrors it (never 0 unless it exited 0)."""
    if ex is None:  # cannot happen: the attachment raises instead of ending without an exit
        sys.stderr.write("\r\nshoal: the attachment ended without the session's end\r\n")
        return 1
    state, reason = ex.get("state"), ex.get("reason")
    sys.stderr.write(f"\r\nshoal: session {state}{': ' + reason if reason else ''}\r\n")
    if state == "exited" and ex.get("code") is not None:
        return int(ex["code"])
    if ex.get("signal"):
        return 128 + int(ex["signal"])
    return 1


@main.command("launch")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--restart", type=click.Choice(["never", "on-failure", "always"]),
              default="on-failure", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def launch(ctx: click.Context, directory: Path, restart: str, as_json: bool) -> None:
    """Start every executable file in DIRECTORY as a daemon session; print where each landed.

    The files must exist at the same path on the nodes (a shared or synced directory)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and os.access(p, os.X_OK))
    if not files:
        fail(f"no executable files in {directory}", 2)

    async def go() -> list[m.SessionRecord]:
        async with client_from(ctx) as c:
            specs = [msgspec.convert({"name": f.name, "command": [str(f.resolve())],
                                      "restart": restart,
                                      "labels": {"launch": directory.name[:253]}},
                                     m.SessionSpec)
                     for f in files]
            import asyncio

            return list(await asyncio.gather(*(c.create_session(s) for s in specs)))

    records = arun(go())
    if as_json:
        click.echo(m.to_json(records).decode())
    else:
        for r in records:
            click.echo(f"{r.name}\t{_record_line(r)}")
    sys.exit(1 if any(r.state == "failed" for r in records) else 0)
