"""Issue 5: shoal side by side with pssh, ClusterShell, parallel-ssh and ssh.

Run from the repository root with `python -m bench.run` (or `make bench`). Everything it starts
(a private sshd, shoal controller and agents) lives in one temporary directory that is removed at
the end. Results go to bench/results/latest.{json,md}, fanout.png and throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from bench import peers
from bench.harness import (
    RESULTS_DIR,
    Case,
    Deadline,
    FleetError,
    Row,
    ShoalFleet,
    add_ratios,
    find_shoal,
    log,
    machine_summary,
    markdown_table,
    measure,
    run_guarded,
    shoal_fleet,
    shoal_problem,
    skipped_rows,
    write_results,
)
from bench.plot import plot_all
from bench.sshd import SshEnv, ensure_packages, private_sshd

# Later benchmark scripts: each is run as `python -m <module>` from the repository root if its
# file exists, and must print its result rows as JSON to stdout (one list, or one object a line)
# with at least workload, tool, n and median_s. BENCH_DEADLINE_S in its environment says how
# many seconds it may take; SHOAL_BIN names the shoal executable.
EXTRA_BENCHMARKS: list[str] = ["bench.sessions", "bench.terminal", "bench.proxy", "bench.ssh",
                               "bench.copy", "bench.scale"]
EXTRA_TIMEOUT_S: dict[str, float] = {"bench.scale": 900.0}  # 10,000 virtual nodes take a while

REPO_ROOT = Path(__file__).resolve().parent.parent
FANOUT_COMMANDS = ("true", "hostname")
GROUP_MARGIN_S = 45.0  # do not start a new workload group with less time than this left


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; the defaults are the issue's benchmark."""
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=ints, default=[10, 50, 100], help="fan-out sizes, all tools")
    parser.add_argument("--shoal-ns", type=ints, default=[1000], help="fan-out sizes, shoal only")
    parser.add_argument("--runs", type=int, default=5, help="counted runs per case (>= 5)")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted warm-up rounds")
    parser.add_argument("--budget", type=float, default=900.0, help="overall seconds")
    parser.add_argument("--bytes", type=int, default=1 << 30, help="throughput payload")
    parser.add_argument(
        "--workloads",
        default="fanout,throughput,big,extra",
        help="comma list of: fanout, throughput, big (shoal-only sizes), extra",
    )
    parser.add_argument("--no-shoal", action="store_true", help="benchmark the peers only")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def fanout_timeout(n: int) -> float:
    """Per-run timeout for a fan-out over n hosts."""
    return min(180.0, 30.0 + 0.3 * n)


def throughput_name(nbytes: int) -> str:
    """Workload name for a payload size, e.g. throughput-1GiB."""
    if nbytes % (1 << 30) == 0:
        return f"throughput-{nbytes >> 30}GiB"
    if nbytes % (1 << 20) == 0:
        return f"throughput-{nbytes >> 20}MiB"
    return f"throughput-{nbytes}B"


def fanout_cases(
    ssh: SshEnv | None, fleet: ShoalFleet | None, shoal_skip: str | None, n: int, command: str
) -> list[Case]:
    """shoal first, then every ssh peer (none when ssh is None), for one command on n hosts."""
    workload, timeout = f"fanout-{command}", fanout_timeout(n)
    cases = [
        Case(
            workload,
            peers.SHOAL,
            n,
            peers.shoal_all_argv(fleet.shoal, command) if fleet else [],
            env=fleet.env if fleet else None,
            timeout_s=timeout,
            skip=None if fleet else shoal_skip or "shoal not available",
            check=fleet.problem if fleet else None,
        )
    ]
    if ssh is not None:
        for tool, (build, missing) in peers.FANOUT_PEERS.items():
            cases.append(
                Case(workload, tool, n, build(ssh, n, command), timeout_s=timeout, skip=missing())
            )
    return cases


def throughput_cases(
    ssh: SshEnv, fleet: ShoalFleet | None, shoal_skip: str | None, nbytes: int
) -> list[Case]:
    """shoal, ssh and a local pipe each moving nbytes of stdout from one host."""
    workload, command = throughput_name(nbytes), f"head -c {nbytes} /dev/zero"
    timeout = max(60.0, nbytes / (8 << 20))  # a run slower than 8 MiB/s fails
    return [
        Case(
            workload,
            peers.SHOAL,
            1,
            peers.shoal_node_argv(fleet.shoal, "node-1", command) if fleet else [],
            env=fleet.env if fleet else None,
            timeout_s=timeout,
            nbytes=nbytes,
            skip=None if fleet else shoal_skip or "shoal not available",
            check=fleet.problem if fleet else None,
        ),
        Case(
            workload, peers.SSH, 1, peers.ssh_argv(ssh, command), timeout_s=timeout, nbytes=nbytes
        ),
        Case(
            workload,
            peers.LOCAL_PIPE,
            1,
            peers.local_pipe_argv(command),
            timeout_s=timeout,
            nbytes=nbytes,
        ),
    ]


def start_fleet(
    stack: ExitStack,
    shoal: Path | None,
    problem: str | None,
    root: Path,
    n: int,
    deadline: Deadline,
) -> tuple[ShoalFleet | None, str | None]:
    """Enter a shoal fleet of n into stack; on failure return None and the reason."""
    if shoal is None or problem:
        return None, problem or "shoal not available"
    if deadline.near(GROUP_MARGIN_S):
        return None, "overall deadline reached"
    try:
        return stack.enter_context(shoal_fleet(shoal, root, n, deadline)), None
    except FleetError as exc:
        log(f"shoal fleet of {n} failed: {exc}")
        return None, f"fleet did not start: {exc}"[:400]


def run_extras(deadline: Deadline, shoal: Path | None) -> list[Row]:
    """Rows from the EXTRA_BENCHMARKS scripts that exist."""
    rows: list[Row] = []
    for module in EXTRA_BENCHMARKS:
        path = REPO_ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            continue
        if deadline.near(GROUP_MARGIN_S):
            rows.append(Row(module, "-", 0, status="skipped", note="overall deadline reached"))
            continue
        timeout = max(10.0, min(EXTRA_TIMEOUT_S.get(module, 300.0), deadline.remaining() - 30))
        env = dict(os.environ, BENCH_DEADLINE_S=str(int(timeout)))
        if shoal is not None:
            env["SHOAL_BIN"] = str(shoal)
        log(f"running {module} (timeout {timeout:.0f}s)")
        try:
            res = subprocess.run(
                [sys.executable, "-m", module],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            rows.append(Row(module, "-", 0, status="failed", note=f"timeout after {timeout:.0f}s"))
            continue
        found = parse_rows(res.stdout)
        if res.returncode != 0 or not found:
            note = f"exit {res.returncode}, {len(found)} rows: {res.stderr.strip()[-300:]}"
            rows.append(Row(module, "-", 0, status="failed", note=note))
        rows.extend(found)
    return rows


def parse_rows(text: str) -> list[Row]:
    """JSON rows from a script's stdout: one list, or one object (or list) per line."""
    text = text.strip()
    items: list[object] = []
    try:
        loaded = json.loads(text)
        items = loaded if isinstance(loaded, list) else [loaded]
    except ValueError:
        for line in text.splitlines():
            try:
                loaded = json.loads(line)
            except ValueError:
                continue
            items.extend(loaded if isinstance(loaded, list) else [loaded])
    return [Row.from_json(item) for item in items if isinstance(item, dict) and "tool" in item]


def bench(args: argparse.Namespace, root: Path, deadline: Deadline, rows: list[Row]) -> None:
    """All workloads in order, appending to rows as each group finishes."""
    workloads = set(args.workloads.split(","))
    ensure_packages()
    shoal = None if args.no_shoal else find_shoal()
    problem = "disabled by --no-shoal" if args.no_shoal else shoal_problem(shoal)
    if problem:
        log(f"shoal will be skipped: {problem}")

    def group(cases_of: list[Case], label: str) -> None:
        if deadline.near(GROUP_MARGIN_S):
            log(f"skipping {label}: overall deadline near")
            rows.extend(skipped_rows(cases_of, "overall deadline reached"))
        else:
            measure(cases_of, deadline, rows, runs=args.runs, warmup=args.warmup)

    max_n = max(args.ns or [1])
    with private_sshd(root / "ssh", max_n) as ssh:
        if "fanout" in workloads:
            for n in args.ns:
                with ExitStack() as stack:
                    fleet, why = start_fleet(stack, shoal, problem, root, n, deadline)
                    for command in FANOUT_COMMANDS:
                        group(fanout_cases(ssh, fleet, why, n, command), f"fan-out {command} N={n}")
        if "throughput" in workloads:
            with ExitStack() as stack:
                fleet, why = start_fleet(stack, shoal, problem, root, 1, deadline)
                group(throughput_cases(ssh, fleet, why, args.bytes), "throughput")
    if "big" in workloads:
        for n in args.shoal_ns:
            with ExitStack() as stack:
                fleet, why = start_fleet(stack, shoal, problem, root, n, deadline)
                for command in FANOUT_COMMANDS:
                    group(fanout_cases(None, fleet, why, n, command), f"shoal fan-out N={n}")
    if "extra" in workloads:
        rows.extend(run_extras(deadline, shoal))


def preamble(args: argparse.Namespace) -> str:
    """Method notes for the markdown report."""
    versions = peers.tool_versions(None if args.no_shoal else find_shoal())
    lines = [
        machine_summary(),
        f"Method: tools interleaved per round, {args.warmup} warm-up round dropped, "
        f"{args.runs} counted runs; wall time of the whole client command as a new process "
        "(stdout to /dev/null). All hosts are 127.0.0.1: shoal's are virtual agents, spread "
        "over one agent process per core (a fleet has an agent per machine), the ssh "
        "peers' are aliases h1..hN of one private sshd whose sessions get an empty HOME (so the "
        "bench host's shell rc files are not timed). `peer/shoal` is the peer's median over "
        "shoal's: above 1 means shoal is faster.\n",
        "Tools: " + "; ".join(f"{k}: {v}" for k, v in versions.items()) + ".\n",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench, write the result files, print the table; 130 when interrupted."""
    args = parse_args(argv)
    deadline = Deadline(args.budget)
    rows, status = run_guarded(lambda root, rows: bench(args, root, deadline, rows),
                               "shoal-bench-")
    add_ratios(rows)
    title = "shoal vs pssh, ClusterShell, parallel-ssh and ssh"
    notes = preamble(args)
    if status:
        notes += "\n**This run stopped early: the results below are partial.**\n"
    write_results(rows, "latest", title, notes, args.out)
    for path in plot_all(rows, args.out):
        log(f"wrote {path}")
    log(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    print(markdown_table(rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
