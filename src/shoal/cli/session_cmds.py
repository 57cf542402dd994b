"""``shoal session ...``, ``shoal logs``, ``shoal launch``: long-lived sessions from the CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

from ..errors import Unavailable
from ..logic.lines import LineSplitter
from ..wire import messages as m
from .main import checking, client_messages, fail, main, with_client
from .options import (
    container_options,
    env_option,
    json_option,
    labels_option,
    print_json,
    prints_record,
)
from .tables import print_table

# A controller that answers 503 (its view of the fleet is catching up after a NATS fault)
# created nothing: `session create` asks again for this long before it gives up.
CREATE_RETRY_FOR = 30.0

if TYPE_CHECKING:
    from ..client.aio import Client
    from ..client.sync import SyncClient

DETACH_KEY = b"\x1d"  # Ctrl-]
ATTACH_REPLAY = 64 << 10  # bytes of recent output shown on attach
LAUNCH_AT_ONCE = 16  # creates in flight for `shoal launch`


def _record_line(r: m.SessionRecord) -> str:
    where = f"{r.node}" + (f" ports {','.join(map(str, r.ports))}" if r.ports else "")
    return f"{r.id}\t{r.state}\t{where or '-'}\t{r.reason}".rstrip()


def _record_row(r: m.SessionRecord) -> tuple[str, ...]:
    exit_ = str(r.exit_code) if r.exit_code is not None else \
        f"sig {r.signal}" if r.signal else "-"
    return (r.id, r.name, r.state, r.node or "-", ",".join(map(str, r.ports)) or "-", exit_,
            str(r.restarts), r.reason or "")


SESSION_COLUMNS = ("ID", "NAME", "STATE", "NODE", "PORTS", "EXIT", "RESTARTS", "REASON")


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
@labels_option("-s", "--selector", dest="selector",
               help="Only nodes with this key=value label (repeatable).")
@click.option("--binpack", is_flag=True, help="Fill nodes up instead of spreading.")
@env_option()
@click.option("--cwd", default=None)
@click.option("--user", default="agent", show_default=True,
              help="agent (the agent's user), ephemeral (a throwaway user) or NAME (a user "
                   "the node's agent allows: run_as in agent.toml).")
@labels_option("-l", "--label", help="key=value on the session (repeatable).")
@click.option("--cpu-seconds", type=int)
@click.option("--memory-mb", type=int)
@click.option("--max-procs", type=int)
@click.option("--max-files", type=int)
@container_options
@json_option("The session's record as JSON instead of its id.")
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@with_client
def create(client: SyncClient, sid: str | None, name: str, shell: str | None, tty: bool,
           stdin: bool, restart: str, timeout: float | None, idle_timeout: float | None,
           detach_timeout: float | None, ports: int, node: str | None,
           selector: dict[str, str], binpack: bool, env: dict[str, str], cwd: str | None,
           user: str, labels: dict[str, str], cpu_seconds: int | None, memory_mb: int | None,
           max_procs: int | None, max_files: int | None, container: dict[str, Any],
           as_json: bool, argv: tuple[str, ...]) -> None:
    """Start a session on the best node; prints its id."""
    if argv and shell or not (argv or shell or container):
        fail("give a command after -- (argv) or --shell 'string', not both", 2)
    if container and len(container["container_ports"]) > ports:
        ports = len(container["container_ports"])  # one allocated port per container port
    with checking("session spec"):
        spec = msgspec.convert({
            "id": sid, "name": name, "command": list(argv) or None, "shell": shell, "tty": tty,
            "stdin": stdin, "restart": restart, "timeout": timeout,
            "idle_timeout": idle_timeout, "detach_timeout": detach_timeout, "ports": ports,
            "node": node, "selector": selector,
            "strategy": "binpack" if binpack else "spread",
            "env": env, "cwd": cwd, "user": user, "labels": labels,
            "limits": {"cpu_seconds": cpu_seconds, "memory_mb": memory_mb,
                       "processes": max_procs, "open_files": max_files},
            **container,
        }, m.SessionSpec)
    deadline = time.monotonic() + CREATE_RETRY_FOR
    while True:
        try:
            record = client.create_session(spec)
            break
        except Unavailable as e:  # nothing was created: safe to ask again
            if time.monotonic() + e.retry_after > deadline:
                raise
            click.echo(f"shoal: {e.message}", err=True)
            time.sleep(e.retry_after)
    if as_json:
        print_json(record)
    else:
        click.echo(record.id)
    if record.state == "failed":
        click.echo(f"shoal: session {record.id} failed: {record.reason}", err=True)
        sys.exit(1)


@session.command("list")
@click.option("--state", default=None, help="pending, running, exited, ... or live.")
@click.option("--node", default=None)
@click.option("--name", default=None)
@prints_record(lambda records: print_table(SESSION_COLUMNS, map(_record_row, records)),
               "The records as a JSON list.")
@with_client
def list_(client: SyncClient, state: str | None, node: str | None,
          name: str | None) -> list[m.SessionRecord]:
    """List sessions."""
    return client.sessions(state, node, name)


@session.command("show")
@click.argument("sid")
@prints_record(print_json, "The same: the record is JSON either way.")
@with_client
def show(client: SyncClient, sid: str) -> m.SessionRecord:
    """Show a session's record as JSON."""
    return client.session(sid)


@session.command("signal")
@click.argument("sid")
@click.argument("sig", default="TERM")
@prints_record(help="The session's record as JSON.")
@with_client
def signal_(client: SyncClient, sid: str, sig: str) -> m.SessionRecord:
    """Send a signal (name or number) to a session's process group."""
    return client.signal(sid, sig)


@session.command("kill")
@click.argument("sids", nargs=-1, required=True)
@click.option("--wait", is_flag=True, help="Wait until each has ended.")
@json_option("The records as a JSON list (the final ones, with --wait).")
@with_client
def kill(client: SyncClient, sids: tuple[str, ...], wait: bool, as_json: bool) -> None:
    """End sessions (SIGTERM, then SIGKILL after the agent's grace period)."""
    records = []
    for sid in sids:
        record = client.kill(sid)
        if wait:
            record = client.wait(sid)
            if not as_json:
                click.echo(_record_line(record))
        records.append(record)
    if as_json:
        print_json(records)


@session.command("rm")
@click.argument("sids", nargs=-1, required=True)
@with_client
def rm(client: SyncClient, sids: tuple[str, ...]) -> None:
    """Remove sessions (ending them first) with their output."""
    for sid in sids:
        client.remove(sid)


@main.command("logs")
@click.argument("sid")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until it ends.")
@click.option("--from", "start", default=0, type=click.IntRange(min=0),
              help="Start at this byte offset.")
@click.option("--tail", type=click.IntRange(min=0), default=None,
              help="Start this many bytes before the end (instead of --from).")
@click.option("--until", default=None, help="Stop (exit 0) once this text appears.")
@click.option("--skip-empty", is_flag=True, help="Leave out blank lines.")
def logs(sid: str, follow: bool, start: int, tail: int | None, until: str | None,
         skip_empty: bool) -> None:
    """Print a session's output (stdout to stdout, stderr to stderr), from anywhere.

    If the controller goes away, it reconnects by itself and goes on from the last byte it
    printed (for up to a minute; then it exits 1 saying where to resume with --from)."""
    client_messages()
    sys.exit(_logs(sid, start, tail, follow, until, skip_empty))


@with_client
def _logs(client: SyncClient, sid: str, start: int, tail: int | None, follow: bool,
          until: str | None, skip_empty: bool) -> int:
    from ..client.aio import LogChunk, LogEnd, LogEof, LogTruncated

    out, err = sys.stdout.buffer, sys.stderr.buffer
    seen = b""  # the end of the output so far, to find --until across chunks
    needle = until.encode() if until else None
    splitters: dict[str, LineSplitter] = {}
    with contextlib.closing(client.logs(sid, start, follow, tail)) as events:
        for ev in events:
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


session.add_command(logs)


@session.command("attach")
@click.argument("sid")
@click.option("--from", "start", default=None, type=click.IntRange(min=0),
              help="Replay output from this offset (default: the last 64 KiB).")
def attach(sid: str, start: int | None) -> None:
    """Attach this terminal to a session (like tmux attach); Ctrl-] detaches."""
    from .run_cmd import raw_terminal

    if not sys.stdin.isatty():
        fail("attach needs a terminal on standard input", 2)
    client_messages(raw_terminal=True)
    with raw_terminal(sys.stdin.fileno()):
        status = _attach(sid, start)
    sys.exit(status)


@with_client
async def _attach(client: Client, sid: str, start: int | None) -> int:
    """Keys, output and SIGWINCH at once: the one command on an event loop of its own."""
    import asyncio

    from ..errors import ConnectError
    from .run_cmd import terminal_size

    loop = asyncio.get_running_loop()
    tail = ATTACH_REPLAY if start is None else None
    async with client.attach(sid, start or 0, tail) as att:
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
@json_option("The sessions' records as a JSON list.")
@with_client
def launch(client: SyncClient, directory: Path, restart: str, as_json: bool) -> None:
    """Start every executable file in DIRECTORY as a daemon session; print where each landed.

    The files must exist at the same path on the nodes (a shared or synced directory)."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in directory.iterdir() if p.is_file() and os.access(p, os.X_OK))
    if not files:
        fail(f"no executable files in {directory}", 2)
    with checking("session spec"):
        specs = [msgspec.convert({"name": f.name, "command": [str(f.resolve())],
                                  "restart": restart,
                                  "labels": {"launch": directory.name[:253]}}, m.SessionSpec)
                 for f in files]
    with ThreadPoolExecutor(LAUNCH_AT_ONCE) as pool:  # the creates overlap on the one client
        records = list(pool.map(client.create_session, specs))
    if as_json:
        print_json(records)
    else:
        for r in records:
            click.echo(f"{r.name}\t{_record_line(r)}")
    sys.exit(1 if any(r.state == "failed" for r in records) else 0)
