"""Issue 2: shoal-only fan-out — the whole `shoal run --all -- true` on 10, 100, 1000 agents.

Run from the repository root with `python -m bench.fanout`. Writes bench/results/fanout.md and
fanout.json: median and min–max wall time of at least 5 runs per fleet size.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import peers
from bench.harness import (
    RESULTS_DIR,
    Case,
    Deadline,
    FleetError,
    Row,
    ShoalFleet,
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

WORKLOAD = "fanout-true"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options; the defaults are issue 2's benchmark."""
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument(
        "--ns",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[10, 100, 1000],
        help="fleet sizes",
    )
    parser.add_argument("--runs", type=int, default=5, help="counted runs per size")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted warm-up runs")
    parser.add_argument("--budget", type=float, default=600.0, help="overall seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def case_for(n: int, fleet: ShoalFleet | None, shoal: Path) -> Case:
    """The timed command for a fleet of n."""
    return Case(
        WORKLOAD,
        peers.SHOAL,
        n,
        peers.shoal_all_argv(shoal, "true"),
        env=fleet.env if fleet else None,
        timeout_s=min(180.0, 30.0 + 0.3 * n),
        check=fleet.problem if fleet else None,
    )


def bench(args: argparse.Namespace, root: Path, deadline: Deadline, rows: list[Row]) -> None:
    """One fleet per size, timed in turn."""
    shoal = find_shoal()
    problem = shoal_problem(shoal)
    for n in args.ns:
        if problem or shoal is None:
            rows.append(Row(WORKLOAD, peers.SHOAL, n, status="skipped", note=problem or ""))
            continue
        if deadline.near(45):
            rows.extend(skipped_rows([case_for(n, None, shoal)], "overall deadline reached"))
            continue
        try:
            with shoal_fleet(shoal, root, n, deadline) as fleet:
                cases = [case_for(n, fleet, shoal)]
                measure(cases, deadline, rows, runs=args.runs, warmup=args.warmup)
        except FleetError as exc:
            log(f"fleet of {n} failed: {exc}")
            rows.append(Row(WORKLOAD, peers.SHOAL, n, status="failed", note=str(exc)[:400]))


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write fanout.{md,json}, print the table; 130 when interrupted."""
    args = parse_args(argv)
    deadline = Deadline(args.budget)
    rows, status = run_guarded(lambda root, rows: bench(args, root, deadline, rows),
                               "shoal-fanout-")
    preamble = (
        machine_summary()
        + f"\nThe whole `shoal run --all -- true` as a new process, against `shoal up` plus one "
        f"`shoal agent --virtual N`; {args.warmup} warm-up run dropped, {args.runs} counted.\n"
    )
    write_results(rows, "fanout", "shoal fan-out (issue 2)", preamble, args.out)
    print(markdown_table(rows))
    return status


if __name__ == "__main__":
    sys.exit(main())
