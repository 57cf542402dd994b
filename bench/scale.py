"""Issue 15, item 5: shoal with 1,000 / 5,000 / 10,000 virtual nodes on this machine.

Run from the repository root with `python -m bench.scale` (bench.run runs it as one of its
EXTRA_BENCHMARKS). For each fleet size N it starts a private `shoal up --agents 0 --port 0
--shared-agent-user` and agent processes of virtual nodes (`b-1..b-1000` in one process
and, past 1,000, the other N - 1,000 as `a-1..` in a second one, as the issue measured),
waits until all N are ready, and measures:

- spawn-floor: this machine alone spawning N `/bin/true` and reaping them, from as many
  worker processes as there are CPUs (os.posix_spawn, no shoal, no NATS): the floor a fan-out
  of N `true` cannot beat;
- run-all: `shoal run --all -- true` (CLI to exit), with the count of nodes it reported
  unreachable (must be 0) and its ratio to the floor (goal: at most 2);
- run-subset: `shoal run -n b-[1-1000] -- true`, the same 1,000 nodes at every N (goal: no
  slower at N = 10,000 than at N = 1,000);
- nodes: `shoal nodes` and `shoal nodes --json` (goal: under 1 s);
- idle-cpu: the controller's (and nats-server's) CPU over a quiet window, in % of one core
  (goal: controller under 5 %);
- agent-mem: each agent process's resident memory per virtual node.

Everything talks to 127.0.0.1 only; each run is bounded and the whole bench stops itself within
its budget (BENCH_DEADLINE_S when set, else --budget). Results: bench/results/scale.{json,md}
and scale.png; the rows are printed as one JSON list on stdout. The machine's load average is
written with the figures: the CPUs are shared with whatever else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.harness import (
    READY_URL,
    RESULTS_DIR,
    Deadline,
    FleetError,
    Row,
    find_shoal,
    log,
    machine_summary,
    run_guarded,
    shoal_problem,
)
from bench.proc import stop_process

SUBSET = 1000  # nodes of the "b-" agent process, the run-subset target at every size
SUBSET_SET = f"b-[1-{SUBSET}]"
UNREACHABLE = re.compile(rb"unreachable", re.IGNORECASE)
IDLE_WINDOW_S = 10.0


@dataclass
class ScaleFleet:
    shoal: Path
    env: dict[str, str]
    n: int
    controller: psutil.Process
    nats: psutil.Process | None
    agents: list[tuple[str, int, subprocess.Popen[bytes]]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def cpu(self) -> float:
        """CPU seconds used so far by the controller, nats-server and the agents, with the
        processes the agents ran (as the floor counts its `true`s)."""
        total = 0.0
        for p in [self.controller, self.nats, *(psutil.Process(a.pid) for _, _, a in
                                                self.agents)]:
            if p is None:
                continue
            t = p.cpu_times()
            total += t.user + t.system
            if p is not self.controller:  # its child is nats-server, counted on its own
                total += t.children_user + t.children_system
        return total

    def problem(self) -> str | None:
        for prefix, _, proc in self.agents:
            if proc.poll() is not None:
                return f"agent {prefix} exited {proc.returncode}"
        return None


def agent_layout(n: int, processes: int) -> list[tuple[str, int]]:
    """(prefix, count) per agent process: ``b-`` holds the subset, the other nodes are
    shared out over ``processes`` more (an agent process uses one core)."""
    if n <= SUBSET:
        return [("b-", n)]
    rest = n - SUBSET
    shares = [rest // processes + (1 if i < rest % processes else 0) for i in range(processes)]
    names = ["a-"] if processes == 1 else [f"a{i + 1}-" for i in range(processes)]
    return [*zip(names, shares, strict=True), ("b-", SUBSET)]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@dataclass
class Timed:
    wall: float
    cpu: float  # CPU seconds of every process involved (shoal: CLI, controller, NATS, agents)
    rc: int
    out: bytes
    err: bytes


def _shoal(fleet: ScaleFleet, args: Sequence[str], timeout: float) -> Timed:
    cpu0, child0 = fleet.cpu(), _children_cpu()
    start = time.monotonic()
    try:
        res = subprocess.run([str(fleet.shoal), *args], env=fleet.env, capture_output=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        rc, out, err = res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -1, e.stdout or b"", e.stderr or b""
    wall = time.monotonic() - start
    time.sleep(0.5)  # the agents' last exits and reaping
    cpu = fleet.cpu() - cpu0 + _children_cpu() - child0
    return Timed(wall, cpu, rc, out, err)


def ready_count(fleet_env: dict[str, str], shoal: Path) -> int:
    try:
        res = subprocess.run([str(shoal), "nodes", "--summary", "--json"], env=fleet_env,
                             capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        if res.returncode != 0:  # a shoal without --summary
            res = subprocess.run([str(shoal), "nodes", "--json"], env=fleet_env,
                                 capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        data = json.loads(res.stdout) if res.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return 0
    if isinstance(data, list):
        return sum(1 for node in data if node.get("state") == "ready")
    return int(data.get("states", {}).get("ready", 0)) if isinstance(data, dict) else 0


@contextmanager
def scale_fleet(shoal: Path, root: Path, n: int, deadline: Deadline,
                processes: int) -> Iterator[ScaleFleet]:
    home = root / f"shoal-{n}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = dict(os.environ, SHOAL_HOME=str(home))
    env.pop("SHOAL_URL", None)
    env.pop("SHOAL_TOKEN", None)
    # Every `shoal` command is a new process: let it keep its bytecode, as an installed one
    # does (without, each compiles aiohttp and friends again: half a second).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    up_log = root / f"up-{n}.log"
    procs: list[subprocess.Popen[bytes]] = []
    limit = min(300.0, max(10.0, deadline.remaining() - 30))
    try:
        with up_log.open("wb") as out:
            # Thousands of virtual nodes per agent process: more than one node credential
            # names (64), so the shared agent user (docs/operations.md, "Virtual fleets").
            up = subprocess.Popen([str(shoal), "up", "--agents", "0", "--port", "0",
                                   "--shared-agent-user"], env=env,
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(up)
        end = time.monotonic() + limit
        while not READY_URL.search(up_log.read_bytes()[-65536:].decode(errors="replace")):
            if up.poll() is not None or time.monotonic() > end:
                raise FleetError(f"shoal up did not come up: {up_log.read_text()[-500:]}")
            time.sleep(0.25)
        controller = psutil.Process(up.pid)
        nats = next((c for c in controller.children() if "nats-server" in c.name()), None)
        fleet = ScaleFleet(shoal, env, n, controller, nats, logs=[up_log])
        started = time.monotonic()
        for prefix, count in agent_layout(n, processes):
            alog = root / f"agent-{prefix}{n}.log"
            fleet.logs.append(alog)
            with alog.open("wb") as out:
                p = subprocess.Popen([str(shoal), "agent", "--virtual", str(count),
                                      "--prefix", prefix], env=env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            procs.append(p)
            fleet.agents.append((prefix, count, p))
        while ready_count(env, shoal) < n:
            if fleet.problem() or time.monotonic() > end:
                tail = " / ".join(p.read_text()[-300:] for p in fleet.logs[1:])
                raise FleetError(f"{n} nodes not ready: {fleet.problem() or 'timeout'}: {tail}")
            time.sleep(1.0)
        log(f"{n} nodes ready in {time.monotonic() - started:.1f}s")
        yield fleet
    finally:
        for proc in reversed(procs):
            stop_process(proc, grace=30)
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- the floor


def _spawn_true(k: int) -> None:
    pids = [os.posix_spawn("/bin/true", ["true"], {}) for _ in range(k)]
    for pid in pids:
        os.waitpid(pid, 0)


def _popen_true(k: int) -> None:
    # What the agent's spawn did per process before os.posix_spawn: pipes, its own session.
    live: list[subprocess.Popen[bytes]] = []
    for _ in range(k):
        live.append(subprocess.Popen(["/bin/true"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, close_fds=True))
        if len(live) >= 256:
            for p in live:
                p.communicate()
            live = []
    for p in live:
        p.communicate()


def _worker_init() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def spawn_floor(n: int, how: Callable[[int], None] = _spawn_true) -> Timed:
    """This machine spawning and reaping n /bin/true, one worker per CPU: wall seconds, and
    CPU seconds of the workers and their `true`s."""
    from multiprocessing import get_context

    workers = os.cpu_count() or 1
    shares = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    pool = get_context("fork").Pool(workers, initializer=_worker_init)
    try:
        pool.map(how, [1] * workers)  # workers up before the clock starts
        start = time.monotonic()
        pool.map(how, shares)
        wall = time.monotonic() - start
    finally:
        pool.close()
        pool.join()
    return Timed(wall, 0.0, 0, b"", b"")


def floor_cpu(n: int, how: Callable[[int], None] = _spawn_true) -> Timed:
    before = _children_cpu()
    t = spawn_floor(n, how)
    t.cpu = _children_cpu() - before  # the workers, reaped, with the `true`s they reaped
    return t


# ---------------------------------------------------------------- measurements


def _row(workload: str, n: int, samples: list[Timed], **extra: object) -> Row:
    tool = "posix_spawn" if workload == "spawn-floor" else (
        "subprocess.Popen" if workload == "spawn-popen" else "shoal")
    times = [t.wall for t in samples]
    row = Row(workload, tool, n, runs=len(times), samples_s=[round(t, 3) for t in times])
    if times:
        row.median_s = round(statistics.median(times), 3)
        row.min_s = round(min(times), 3)
        row.max_s = round(max(times), 3)
        row.extra["cpu_s"] = round(statistics.median(t.cpu for t in samples), 3)
    else:
        row.status = "failed"
    row.extra.update(extra)
    return row


def _ratio(a: list[Timed], b: list[Timed], what: str) -> float | None:
    """Median of the per-round ratios a/b (each pair measured back to back)."""
    pairs = [getattr(x, what) / getattr(y, what) for x, y in zip(a, b, strict=False)
             if getattr(y, what) > 0]
    return round(statistics.median(pairs), 2) if pairs else None


def measure_rounds(fleet: ScaleFleet, runs: int, timeout: float, rows: list[Row]) -> None:
    """Rounds of floor, run-all, run-subset back to back (a warm-up round first), so each
    ratio compares figures taken under the same load from the rest of the machine."""
    n = fleet.n
    cases = {"run-all": ["--all", "--", "true"], "run-subset": ["-n", SUBSET_SET, "--", "true"]}
    floors: list[Timed] = []
    got: dict[str, list[Timed]] = {w: [] for w in cases}
    unreachable: dict[str, int] = dict.fromkeys(cases, 0)
    errors: dict[str, list[str]] = {w: [] for w in cases}
    for i in range(runs + 1):
        done = {}
        floor = None
        # The subset first: right after 10,000 processes the machine is still reaping them.
        for workload, args in reversed(cases.items()):
            if workload == "run-all":  # the floor right before the run it is compared with
                time.sleep(2.0)
                floor = floor_cpu(n)
                log(f"spawn-floor n={n}: {floor.wall:.2f}s, {floor.cpu:.2f} CPU s"
                    f"{' (warm-up)' if i == 0 else ''}")
            t = _shoal(fleet, ["run", *args], timeout)
            bad = len(UNREACHABLE.findall(t.out + t.err))
            log(f"{workload} n={n}: {t.wall:.2f}s, {t.cpu:.2f} CPU s, rc={t.rc}, "
                f"unreachable={bad}{' (warm-up)' if i == 0 else ''}")
            if t.rc != 0:
                errors[workload].append(f"rc={t.rc}: {t.err.decode(errors='replace')[-300:]}")
            done[workload] = t
            if i:
                unreachable[workload] = max(unreachable[workload], bad)
        time.sleep(2.0)
        if i and floor is not None:
            floors.append(floor)
            for workload, t in done.items():
                if t.rc == 0:
                    got[workload].append(t)
    rows.append(_row("spawn-floor", n, floors))
    for workload in cases:
        row = _row(workload, n, got[workload], unreachable=unreachable[workload],
                   failed_runs=len(errors[workload]))
        if workload == "run-all":
            row.extra["ratio_to_floor"] = _ratio(got[workload], floors, "wall")
            row.extra["cpu_ratio_to_floor"] = _ratio(got[workload], floors, "cpu")
        if errors[workload]:
            row.note = f"{len(errors[workload])} run(s) failed: {errors[workload][0]}"
            if not got[workload]:
                row.status = "failed"
        rows.append(row)


def idle_cpu(fleet: ScaleFleet, window: float = IDLE_WINDOW_S) -> dict[str, float]:
    """% of one core used by the controller (shoal up without its children) and nats-server."""
    time.sleep(3.0)  # let the last run's aftermath settle
    procs = {"controller": fleet.controller, "nats": fleet.nats}
    procs.update({f"agent_{p}": psutil.Process(proc.pid) for p, _, proc in fleet.agents})
    before = {k: p.cpu_times() for k, p in procs.items() if p is not None}
    time.sleep(window)
    out = {}
    for k, p in procs.items():
        if p is None:
            continue
        a, b = before[k], p.cpu_times()
        out[k] = round(100 * ((b.user - a.user) + (b.system - a.system)) / window, 1)
    return out


def agent_memory(fleet: ScaleFleet) -> dict[str, float]:
    """Each agent process's RSS, per node; and, from the biggest and smallest process, what
    one more node costs (the process's own baseline cancels out)."""
    out: dict[str, float] = {}
    sizes = []
    for prefix, count, proc in fleet.agents:
        rss = psutil.Process(proc.pid).memory_info().rss
        sizes.append((count, rss))
        out[f"{prefix}nodes"] = count
        out[f"{prefix}rss_mib"] = round(rss / (1 << 20), 1)
        out[f"{prefix}kib_per_node"] = round(rss / 1024 / count, 1)
    (small, small_rss), (big, big_rss) = min(sizes), max(sizes)
    if big > small:
        out["marginal_kib_per_node"] = round((big_rss - small_rss) / 1024 / (big - small), 1)
    return out


def bench_size(shoal: Path, root: Path, n: int, runs: int, deadline: Deadline,
               rows: list[Row], processes: int) -> None:
    popen = [floor_cpu(n, _popen_true)]
    rows.append(_row("spawn-popen", n, popen))
    log(f"spawn with Popen and pipes n={n}: {popen[0].wall:.2f}s, {popen[0].cpu:.2f} CPU s")
    with scale_fleet(shoal, root, n, deadline, processes) as fleet:
        timeout = 60 + n / 100
        idle = idle_cpu(fleet)
        log(f"idle CPU n={n}: {idle}")
        rows.append(Row("idle-cpu", "shoal", n, runs=1, extra={"cpu_percent": idle}))
        mem = agent_memory(fleet)
        rows.append(Row("agent-mem", "shoal", n, runs=1, extra=mem))
        measure_rounds(fleet, runs, timeout, rows)
        for workload, args in (("nodes", ["nodes"]), ("nodes-json", ["nodes", "--json"])):
            samples = []
            for _ in range(runs):
                t = _shoal(fleet, args, 60)
                if t.rc == 0:
                    samples.append(t)
            log(f"{workload} n={n}: " + ", ".join(f"{t.wall:.2f}s" for t in samples))
            rows.append(_row(workload, n, samples,
                             output_bytes=max((len(t.out) for t in samples), default=0)))
        rows.append(Row("idle-cpu-after", "shoal", n, runs=1,
                        extra={"cpu_percent": idle_cpu(fleet)}))
        rows[-1].extra["memory"] = agent_memory(fleet)


# ---------------------------------------------------------------- results


def markdown(rows: Sequence[Row]) -> str:
    sizes = sorted({r.n for r in rows})
    by = {(r.workload, r.n): r for r in rows}

    def med(w: str, n: int) -> str:
        r = by.get((w, n))
        return "–" if r is None or r.median_s is None else f"{r.median_s:.2f}"

    head = "| figure | " + " | ".join(f"N={n:,}" for n in sizes) + " | goal |"
    lines = [head, "|---|" + "---:|" * len(sizes) + "---|"]
    goals = {"spawn-floor": "(the floor)", "spawn-popen": "(Popen with pipes, for comparison)",
             "run-all": "≤ 2× floor, 0 unreachable",
             "run-subset": "no slower than at N=1,000", "nodes": "< 1 s",
             "nodes-json": "< 1 s"}
    for w in ("spawn-floor", "spawn-popen", "run-all", "run-subset", "nodes", "nodes-json"):
        lines.append(f"| {w} s | " + " | ".join(med(w, n) for n in sizes) + f" | {goals[w]} |")

    def extra(w: str, n: int, key: str) -> str:
        r = by.get((w, n))
        v = None if r is None else r.extra.get(key)
        return "–" if v is None else str(v)

    lines.append("| run-all / floor, wall (median of rounds) | " + " | ".join(
        extra("run-all", n, "ratio_to_floor") for n in sizes) + " | ≤ 2 |")
    lines.append("| run-all / floor, CPU s (median of rounds) | " + " | ".join(
        extra("run-all", n, "cpu_ratio_to_floor") for n in sizes) + " | |")
    for w in ("spawn-floor", "spawn-popen", "run-all", "run-subset"):
        lines.append(f"| {w} CPU s | " + " | ".join(extra(w, n, "cpu_s") for n in sizes)
                     + " | |")
    lines.append("| run-all unreachable | " + " | ".join(extra("run-all", n, "unreachable")
                                                         for n in sizes) + " | 0 |")
    base = by.get(("run-subset", min(sizes)))
    if base is not None and base.median_s:
        lines.append("| run-subset / at N=1,000 | " + " | ".join(
            "–" if (r := by.get(("run-subset", n))) is None or not r.median_s
            else f"{r.median_s / base.median_s:.2f}" for n in sizes) + " | ≤ 1 (noise aside) |")

    def cpu(n: int, who: str) -> str:
        r = by.get(("idle-cpu", n))
        v = None if r is None else r.extra.get("cpu_percent", {}).get(who)
        return "–" if v is None else f"{v}"

    lines.append("| idle controller % core | " + " | ".join(cpu(n, "controller") for n in sizes)
                 + " | < 5 |")
    lines.append("| idle nats-server % core | " + " | ".join(cpu(n, "nats") for n in sizes)
                 + " | |")
    prefixes = sorted({k[:-len("kib_per_node")] for r in rows if r.workload == "agent-mem"
                       for k in r.extra if k.endswith("kib_per_node")
                       and not k.startswith("marginal")})
    for prefix in prefixes:
        lines.append(f"| agent {prefix} KiB per node | " + " | ".join(
            extra("agent-mem", n, f"{prefix}kib_per_node") for n in sizes) + " | (stated) |")
    lines.append("| agent KiB per extra node | " + " | ".join(
        extra("agent-mem", n, "marginal_kib_per_node") for n in sizes) + " | (stated) |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no scale plot")
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for w, style in (("spawn-floor", "k--"), ("run-all", "C0-"), ("run-subset", "C1-"),
                     ("nodes", "C2-"), ("nodes-json", "C3:")):
        pts = sorted((r.n, r.median_s) for r in rows if r.workload == w and r.median_s)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=w)
    floor = sorted((r.n, r.median_s) for r in rows if r.workload == "spawn-floor" and r.median_s)
    if floor:
        ax.plot([p[0] for p in floor], [2 * p[1] for p in floor], color="grey", linestyle=":",
                label="2 × floor (the run-all goal)")
    ax.set_xlabel("virtual nodes registered")
    ax.set_ylabel("median wall time, s")
    ax.set_title("shoal at scale (2 CPUs, shared)")
    ax.legend()
    ax.grid(alpha=0.3)
    pts = sorted((r.n, r.extra.get("cpu_percent", {})) for r in rows if r.workload == "idle-cpu")
    if pts:
        for who, colour in (("controller", "C0"), ("nats", "C1")):
            bx.plot([p[0] for p in pts], [p[1].get(who, 0) for p in pts], color=colour,
                    marker="o", label=f"idle {who}")
        bx.axhline(5, color="grey", linestyle="--", label="controller goal")
        bx.set_xlabel("virtual nodes registered")
        bx.set_ylabel("% of one core")
        bx.legend()
        bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: Sequence[Row], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scale.json").write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    text = ["# shoal at 1,000 / 5,000 / 10,000 virtual nodes\n", machine_summary(),
            "Agents: `b-1..b-1000` in one process, the rest (`a…-`) shared out over one more "
            "process per CPU; the floor is this machine spawning N `/bin/true` with nothing "
            "else, one worker per CPU (see bench/scale.py). Each ratio is the median over "
            "rounds of a run and the floor measured just before it. The load average counts "
            "the bench's own bursts of 10,000 processes; CPU seconds are of every process "
            "involved, children included, and do not depend on the rest of the machine's "
            "load.\n",
            markdown(rows)]
    (out_dir / "scale.md").write_text("\n".join(text))
    plot(rows, out_dir / "scale.png")


def size_cost_s(n: int, runs: int) -> float:
    """A generous guess at one size's seconds on a busy 2-CPU machine: fleet start and
    stop, the idle window, and per round a floor, two runs and the listings."""
    return 60 + n / 250 + (runs + 1) * (6 + n / 400) + runs * 3


def rounds_within(sizes: Sequence[int], wanted: int, budget: float) -> int:
    """The most rounds (at least 1) for which every size fits the budget."""
    for runs in range(wanted, 0, -1):
        if sum(size_cost_s(n, runs) for n in sizes) <= budget:
            return runs
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(prog="python -m bench.scale",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=ints, default=[1000, 5000, 10000])
    parser.add_argument("--runs", type=int, default=3, help="counted runs per figure")
    parser.add_argument("--budget", type=float,
                        default=float(os.environ.get("BENCH_DEADLINE_S", 1500)))
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="agent processes for the nodes beyond b-1..b-1000")
    args = parser.parse_args(argv)
    shoal = find_shoal()
    problem = shoal_problem(shoal)
    if problem or shoal is None:
        log(f"cannot benchmark: {problem}")
        print(json.dumps([Row("run-all", "shoal", 0, status="skipped",
                              note=problem or "").to_json()]))
        return 1
    deadline = Deadline(args.budget)
    runs = rounds_within(args.sizes, args.runs, args.budget)
    if runs < args.runs:
        log(f"{args.budget:.0f}s of budget: {runs} round(s) per size instead of {args.runs}")

    def bench(root: Path, rows: list[Row]) -> None:
        for n in args.sizes:
            if deadline.near(size_cost_s(n, 1) / 2):
                log(f"n={n}: skipped, not enough time left")
                rows.append(Row("run-all", "shoal", n, status="skipped", note="budget"))
                continue
            try:
                bench_size(shoal, root, n, runs, deadline, rows, args.processes)
            except FleetError as e:
                log(f"n={n}: {e}")
                rows.append(Row("run-all", "shoal", n, status="failed", note=str(e)[:500]))

    rows, status = run_guarded(bench, "shoal-scale-")
    write(rows, args.out)
    print(json.dumps([r.to_json() for r in rows]))
    return status


if __name__ == "__main__":
    sys.exit(main())
