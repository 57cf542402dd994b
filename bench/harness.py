"""Shared benchmark machinery: deadline, interleaved timing loop, shoal fleet, result files."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.proc import stop_process, timed_run
from shoal.wire.enrollment import MAX_NAMES

RESULTS_DIR = Path(__file__).with_name("results")
MIB = 1 << 20
READY_URL = re.compile(r"http://127\.0\.0\.1:\d+/\?token=")
START_LOAD = os.getloadavg()  # other work on the machine skews timings: reported with results


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays for the final table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Deadline:
    """An overall time budget for a whole bench run."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self.end = time.monotonic() + budget_s

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(0.0, self.end - time.monotonic())

    def near(self, margin_s: float) -> bool:
        """True when less than margin_s is left."""
        return self.remaining() < margin_s


@dataclass
class Case:
    """One (workload, tool, n) to time; `skip` holds why it cannot run, if so."""

    workload: str
    tool: str
    n: int
    argv: list[str]
    env: dict[str, str] | None = None
    timeout_s: float = 60.0
    nbytes: int | None = None
    skip: str | None = None
    # Called before each run: a reason the case cannot run any more (e.g. its daemon died).
    check: Callable[[], str | None] | None = None


@dataclass
class Row:
    """The summary of one case, as written to latest.json."""

    workload: str
    tool: str
    n: int
    runs: int = 0
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    mib_per_s: float | None = None
    ratio_vs_shoal: float | None = None
    status: str = "ok"  # ok | partial (fewer runs than asked) | failed | skipped
    note: str = ""
    samples_s: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A plain dict without the keys that do not apply; `extra` keys merged in."""
        data = asdict(self)
        extra = data.pop("extra")
        for key in ("mib_per_s", "ratio_vs_shoal"):
            if data[key] is None:
                del data[key]
        return {**extra, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Row:
        """A row from another script's JSON; unknown keys are kept in `extra`."""
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        row = cls(
            workload=str(data.get("workload", "?")),
            tool=str(data.get("tool", "?")),
            n=int(data.get("n") or 0),
        )
        for key, value in data.items():
            if key in known and key not in ("workload", "tool", "n"):
                setattr(row, key, value)
            elif key not in known:
                row.extra[key] = value
        return row


def skipped_rows(cases: Sequence[Case], reason: str) -> list[Row]:
    """Rows for cases that were not run at all."""
    return [Row(c.workload, c.tool, c.n, status="skipped", note=reason) for c in cases]


def measure(
    cases: Sequence[Case],
    deadline: Deadline,
    sink: list[Row],
    runs: int = 5,
    warmup: int = 1,
    max_failures: int = 2,
    reserve_s: float = 20.0,
) -> list[Row]:
    """Time the cases interleaved (A B C A B C ...): `warmup` rounds dropped, `runs` counted.

    A case that fails `max_failures` times is dropped from later rounds. Rounds stop early when
    the deadline (less `reserve_s` kept for cleanup) runs out. The rows are appended to `sink`
    even when interrupted, so partial results survive Ctrl-C.
    """
    samples: dict[int, list[float]] = {i: [] for i in range(len(cases))}
    errors: dict[int, list[str]] = {i: [] for i in range(len(cases))}
    stopped = ""
    try:
        for round_no in range(warmup + runs):
            if stopped:
                break
            counted = round_no >= warmup
            for i, case in enumerate(cases):
                if case.skip or len(errors[i]) >= max_failures:
                    continue
                broken = case.check() if case.check else None
                if broken:
                    errors[i].extend([broken] * (max_failures - len(errors[i])))
                    log(f"{case.workload} {case.tool} n={case.n}: dropped: {broken[:200]}")
                    continue
                left = deadline.remaining() - reserve_s
                if left < 1.0:
                    stopped = "overall deadline reached"
                    break
                result = timed_run(case.argv, case.env, timeout=min(case.timeout_s, left))
                tag = f"{case.workload} {case.tool} n={case.n} round {round_no + 1}"
                if result.ok:
                    if counted:
                        samples[i].append(result.seconds)
                    log(f"{tag}: {result.seconds:.3f}s{'' if counted else ' (warm-up)'}")
                else:
                    errors[i].append(result.error)
                    log(f"{tag}: FAILED {result.error[:200]}")
    except BaseException:
        stopped = "interrupted"
        raise
    finally:
        rows = [_summarise(c, samples[i], errors[i], runs, stopped) for i, c in enumerate(cases)]
        sink.extend(rows)
    return rows


def _summarise(case: Case, times: list[float], errors: list[str], runs: int, stopped: str) -> Row:
    row = Row(
        case.workload, case.tool, case.n, runs=len(times), samples_s=[round(t, 4) for t in times]
    )
    if case.skip:
        row.status, row.note = "skipped", case.skip
        return row
    notes = []
    if errors:
        notes.append(f"{len(errors)} failed run(s): {errors[0][:300]}")
    if times:
        row.median_s = round(statistics.median(times), 4)
        row.min_s = round(min(times), 4)
        row.max_s = round(max(times), 4)
        if case.nbytes:
            row.mib_per_s = round(case.nbytes / MIB / statistics.median(times), 1)
        if len(times) < runs:
            row.status = "partial"
            notes.insert(
                0, f"only {len(times)} of {runs} runs" + (f" ({stopped})" if stopped else "")
            )
    else:
        row.status = "failed" if errors else "skipped"
        if not errors:
            notes.append(stopped or "not run")
    row.note = "; ".join(notes)
    return row


def add_ratios(rows: Sequence[Row]) -> None:
    """Set ratio_vs_shoal = peer median / shoal median for rows sharing (workload, n)."""
    shoal = {(r.workload, r.n): r.median_s for r in rows if r.tool == "shoal" and r.median_s}
    for row in rows:
        base = shoal.get((row.workload, row.n))
        if row.tool != "shoal" and base and row.median_s:
            row.ratio_vs_shoal = round(row.median_s / base, 2)


# ---------------------------------------------------------------- shoal fleet


class FleetError(RuntimeError):
    """The shoal controller or agents did not come up."""


@dataclass
class ShoalFleet:
    """A running `shoal up` plus `shoal agent --virtual n`, usable through `env`."""

    shoal: Path
    home: Path
    env: dict[str, str]
    n: int
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def problem(self) -> str | None:
        """Why the fleet is no longer usable (a daemon exited), or None."""
        for name, proc, log_path in self.procs:
            if proc.poll() is not None:
                tail = _tail(log_path, 300).replace("\n", " / ")
                return f"`{name}` exited {proc.returncode} mid-bench: {tail}"
        return None


def find_shoal() -> Path | None:
    """The `shoal` executable next to the running interpreter (same venv bin dir)."""
    path = Path(sys.executable).parent / "shoal"
    return path if path.exists() else None


def shoal_problem(shoal: Path | None) -> str | None:
    """Why the shoal CLI cannot be benchmarked here, or None when `shoal up --help` works."""
    if shoal is None:
        return f"no shoal executable next to {sys.executable}"
    try:
        res = subprocess.run(
            [str(shoal), "up", "--help"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`shoal up --help` failed: {exc}"
    if res.returncode != 0:
        return f"`shoal up --help` exit {res.returncode}: {res.stderr.decode()[-300:]}"
    return None


def _tail(path: Path, limit: int = 600) -> str:
    """The end of a log file, API tokens masked (the text may end up in the results)."""
    try:
        text = path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""
    return re.sub(r"token=[\w-]+", "token=…", text)


def _wait_for(
    check: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes], log_: Path
) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        if proc.poll() is not None:
            raise FleetError(f"{what}: process exited {proc.returncode}: {_tail(log_)}")
        time.sleep(0.25)
    raise FleetError(f"{what}: not ready after {timeout:.0f}s: {_tail(log_)}")


def ready_nodes(shoal: Path, env: dict[str, str], prefix: str = "node-") -> int:
    """How many nodes `shoal nodes --json` lists as ready (0 if it cannot say yet)."""
    try:
        res = subprocess.run(
            [str(shoal), "nodes", "--json"],
            env=env,
            capture_output=True,
            timeout=15,
            stdin=subprocess.DEVNULL,
        )
        nodes = json.loads(res.stdout) if res.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0
    if isinstance(nodes, dict):  # tolerate {"nodes": [...]}
        nodes = nodes.get("nodes", [])
    return sum(
        1
        for node in nodes
        if isinstance(node, dict)
        and node.get("state") == "ready"
        and str(node.get("name", "")).startswith(prefix)
    )


@contextmanager
def shoal_fleet(
    shoal: Path,
    root: Path,
    n: int,
    deadline: Deadline | None = None,
    timeout_s: float = 120.0,
    capacity: int | None = None,
    apart: bool = False,
    up_args: Sequence[str] = (),
) -> Iterator[ShoalFleet]:
    """Start `shoal up --agents 0 --port 0` and the n virtual nodes under root/shoal, or
    with `capacity`, `shoal up --agents n --capacity C` alone (controller, agents and their
    sessions in one process tree, which the terminal bench measures); with `apart` too,
    the nodes take `capacity` sessions each in agent processes of their own.

    The virtual nodes are spread over one `shoal agent --virtual` process per core: a real
    fleet has an agent per machine, and the ssh peers' sshd forks a process per connection,
    so neither side is held to one core. Each process enrolls with a node identity of its
    own, unless it serves more nodes than one credential names (64): then the fleet uses
    the shared agent user (docs/operations.md, "Virtual fleets").

    ``up_args`` go to `shoal up` too (`--shared-agent-user`).

    Yields once all n nodes are ready; SIGTERMs them (agent first) and removes SHOAL_HOME on exit.
    """
    home = root / "shoal"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = dict(os.environ, SHOAL_HOME=str(home))
    env.pop("SHOAL_URL", None)
    env.pop("SHOAL_TOKEN", None)
    local = [] if capacity is None else ["--capacity", str(capacity)]
    apart = apart or capacity is None
    shares = _shares(n, min(n, os.cpu_count() or 1)) if apart else []
    shared = ["--shared-agent-user"] if shares and max(shares) > MAX_NAMES else []
    limit = timeout_s if deadline is None else min(timeout_s, max(5.0, deadline.remaining() - 20))
    up_log, agent_log = root / f"shoal-up-{n}.log", root / f"shoal-agent-{n}.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with up_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [str(shoal), "up", "--agents", "0" if apart else str(n),
                     *([] if apart else local), *shared, *up_args, "--port", "0"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        started = time.monotonic()
        _wait_for(
            lambda: bool(READY_URL.search(_tail(up_log, 1 << 16))),
            limit,
            "shoal up",
            procs[0],
            up_log,
        )
        if capacity is not None and not apart:
            _wait_for(lambda: ready_nodes(shoal, env) >= n, limit, f"{n} nodes of shoal up",
                      procs[0], up_log)
            log(f"shoal up: {n} agents x capacity {capacity} ready in "
                f"{time.monotonic() - started:.1f}s")
            yield ShoalFleet(shoal, home, env, n, [("shoal up", procs[0], up_log)])
            return
        with agent_log.open("wb") as out:
            for i, count in enumerate(shares):
                prefix = "node-" if len(shares) == 1 else f"node-{chr(ord('a') + i)}"
                procs.append(
                    subprocess.Popen(
                        [str(shoal), "agent", "--virtual", str(count), "--prefix", prefix,
                         *local],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        _wait_for(
            lambda: ready_nodes(shoal, env) >= n,
            limit,
            f"shoal agent --virtual {'+'.join(map(str, shares))}",
            procs[1],
            agent_log,
        )
        log(f"shoal fleet of {n} ({len(shares)} agent processes) ready in "
            f"{time.monotonic() - started:.1f}s")
        yield ShoalFleet(
            shoal,
            home,
            env,
            n,
            [("shoal up", procs[0], up_log), *(("shoal agent", p, agent_log) for p in procs[1:])],
        )
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        shutil.rmtree(home, ignore_errors=True)


def _shares(n: int, parts: int) -> list[int]:
    """n split into ``parts`` counts that differ by at most one."""
    return [n // parts + (i < n % parts) for i in range(parts)]


# ---------------------------------------------------------------- interruption


class Interrupted(Exception):
    """Raised in the main thread on the first SIGINT/SIGTERM/SIGHUP so `finally` blocks clean up."""


def install_signal_handlers() -> None:
    """First Ctrl-C, SIGTERM or SIGHUP raises Interrupted; later ones are ignored during cleanup."""
    fired: list[int] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if fired:
            log(f"{name} again: still cleaning up")
            return
        fired.append(signum)
        raise Interrupted(name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# ---------------------------------------------------------------- result files


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _latency_table(rows: Sequence[Row]) -> str:
    """Rows measured in milliseconds or requests per second (terminal, sessions, proxy)."""
    lines = ["| workload | tool | N | samples | p50 ms | p99 ms | per s | added p50 ms | status |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        e = r.extra
        p50 = e.get("p50_ms", e.get("p50_s", 0) * 1000 if "p50_s" in e else None)
        p99 = e.get("p99_ms", e["p99_s"] * 1000 if "p99_s" in e else None)
        if p50 is None and r.median_s is not None:
            p50 = r.median_s * 1000
        lines.append(f"| {r.workload} | {r.tool} | {r.n} | {r.runs} | {_fmt(p50, 2)} "
                     f"| {_fmt(p99, 2)} | {_fmt(e.get('per_s', e.get('rps')), 0)} "
                     f"| {_fmt(e.get('added_p50_ms'), 3)} | {r.status} |")
    return "\n".join(lines) + "\n"


def markdown_table(rows: Sequence[Row]) -> str:
    """The timed-command rows as one table, latency-style rows as a second."""
    timed = [r for r in rows if not any(k in r.extra for k in ("p50_ms", "p99_s", "rps"))]
    other = [r for r in rows if r not in timed]
    lines = [
        "| workload | tool | N | runs | median s | min s | max s | MiB/s | peer/shoal | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in timed:
        status = r.status if not r.note else f"{r.status}: {r.note[:120]}"
        status = status.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r.workload} | {r.tool} | {r.n} | {r.runs} | {_fmt(r.median_s)} | {_fmt(r.min_s)}"
            f" | {_fmt(r.max_s)} | {_fmt(r.mib_per_s, 1)} | {_fmt(r.ratio_vs_shoal, 2)}"
            f" | {status} |"
        )
    table = "\n".join(lines) + "\n"
    return table + ("\n" + _latency_table(other) if other else "")


def ratio_lines(rows: Sequence[Row]) -> list[str]:
    """One sentence per peer row that has a ratio to shoal."""
    shoal_rate = {(r.workload, r.n): r.mib_per_s for r in rows if r.tool == "shoal"}
    out = []
    for r in rows:
        if r.ratio_vs_shoal is None:
            continue
        if r.ratio_vs_shoal >= 1:
            verdict = f"{r.ratio_vs_shoal:.1f}× faster than"
        else:
            verdict = f"{1 / r.ratio_vs_shoal:.1f}× slower than"
        line = f"- {r.workload}, N={r.n}: shoal is {verdict} {r.tool}"
        rate = shoal_rate.get((r.workload, r.n))
        if rate is not None and r.mib_per_s is not None:
            line += f" ({rate:.0f} vs {r.mib_per_s:.0f} MiB/s)"
        out.append(line)
    return out


def write_results(
    rows: Sequence[Row], stem: str, title: str, preamble: str = "", out_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Write <stem>.json (a list of rows) and <stem>.md (table plus ratios)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    parts = [f"# {title}\n", preamble, markdown_table(rows)]
    ratios = ratio_lines(rows)
    if ratios:
        parts.append("## Ratios (peer median / shoal median)\n\n" + "\n".join(ratios) + "\n")
    md_path.write_text("\n".join(p for p in parts if p))
    return json_path, md_path


def machine_summary() -> str:
    """A line about the machine the numbers come from."""
    start, end = (", ".join(f"{x:.1f}" for x in load) for load in (START_LOAD, os.getloadavg()))
    return (
        f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}; load average {start} at start, {end} at end.\n"
    )


def run_guarded(bench: Callable[[Path, list[Row]], None], prefix: str) -> tuple[list[Row], int]:
    """Run ``bench(root, rows)`` in a fresh temporary directory, keeping whatever rows it got
    when interrupted or failing; returns the rows and the exit status (0, 1 or 130)."""
    install_signal_handlers()
    rows: list[Row] = []
    root = Path(tempfile.mkdtemp(prefix=prefix))
    status = 0
    try:
        bench(root, rows)
    except (KeyboardInterrupt, Interrupted) as exc:
        log(f"interrupted ({exc or 'SIGINT'}); writing partial results")
        status = 130
    except Exception:
        log(f"bench failed; writing partial results:\n{traceback.format_exc()}")
        status = 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows, status


def compare_main(
    args: Any, bench: Callable[[Any, Path, Deadline, list[Row]], None], stem: str, title: str,
    preamble: str, prefix: str,
) -> int:
    """The driver of a bench against peers: run within ``args.budget``, add the ratios, write
    <stem>.{json,md} under ``args.out`` and print the rows as JSON; 130 when interrupted."""
    deadline = Deadline(args.budget)
    rows, status = run_guarded(lambda root, rows: bench(args, root, deadline, rows), prefix)
    add_ratios(rows)
    write_results(rows, stem, title, machine_summary() + preamble, args.out)
    print(json.dumps([r.to_json() for r in rows]))
    return status
