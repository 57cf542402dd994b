"""Session output throughput: how fast a session's output is stored, and read back.

Run from the repository root with `python -m bench.output [--shared-agent-user]`. It starts
a private `shoal up --agents 2 --capacity 50 --port 0` in a temporary SHOAL_HOME (node
identities, or with the flag the one shared agent user), prints the rows as one JSON list on
stdout and writes bench/results/output[-shared].md and .json.
All traffic is to 127.0.0.1.

- output-store: one session at a time printing `--mib` MiB (`head -c`, of /dev/zero) as fast
  as its pipe goes; MiB/s = bytes / (`ended - started` of its record). The agent writes the
  final record only once JetStream has acknowledged every byte, so this is pipe -> agent ->
  JetStream, stored.
- output-store-parallel: `--parallel` such sessions at once (`--mib` / `--parallel` MiB
  each); MiB/s = all their bytes / (last `ended` - first `started`).
- output-read: `GET /api/v1/sessions/ID/logs` of an output-store session read to its end
  (NDJSON, base64): MiB/s at the client.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.harness import RESULTS_DIR, Deadline, Row, shoal_fleet
from bench.sessions import TOOL, fleet_client, run_main, shoal_bin
from shoal.client.aio import Client, LogChunk
from shoal.wire import messages as m

COLUMNS = ("workload", "n", "runs", "median_s", "min_s", "max_s", "mib_per_s", "status", "note")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="shoal session output throughput")
    parser.add_argument("--mib", type=int, default=256, help="MiB a session prints")
    parser.add_argument("--runs", type=int, default=3, help="runs of each workload")
    parser.add_argument("--parallel", type=int, default=8, help="sessions at once")
    parser.add_argument("--shared-agent-user", action="store_true",
                        help="shoal up --shared-agent-user (no node credentials)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds, at most")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return parser.parse_args(argv)


def _spec(nbytes: int) -> m.SessionSpec:
    return m.SessionSpec(shell=f"head -c {nbytes} /dev/zero", output_cap=2 * nbytes)


async def _store(client: Client, nbytes: int, count: int) -> tuple[float, list[str]]:
    """Seconds from the first start to the last end of ``count`` sessions of ``nbytes``."""
    made = await asyncio.gather(*(client.create_session(_spec(nbytes)) for _ in range(count)))
    done = await asyncio.gather(*(client.wait(r.id, timeout=300) for r in made))
    for r in done:
        if r.state != "exited" or r.exit_code != 0 or r.output_bytes != nbytes:
            raise RuntimeError(f"session {r.id} ended {r.state} ({r.reason}), "
                               f"{r.output_bytes} of {nbytes} bytes")
    return max(r.ended for r in done) - min(r.started for r in done), [r.id for r in done]


async def _read(client: Client, sid: str, nbytes: int) -> float:
    began = time.monotonic()
    got = 0
    async for event in client.logs(sid):
        if isinstance(event, LogChunk):
            got += len(event.data)
    if got != nbytes:
        raise RuntimeError(f"read {got} of {nbytes} bytes of {sid}")
    return time.monotonic() - began


def _row(workload: str, n: int, times: list[float], nbytes: int) -> Row:
    median = statistics.median(times)
    return Row(workload, TOOL, n, runs=len(times), median_s=median, min_s=min(times),
               max_s=max(times), mib_per_s=nbytes / (1 << 20) / median, samples_s=times)


def bench(args: argparse.Namespace, root: Path, deadline: Deadline, rows: list[Row]) -> None:
    shoal = shoal_bin()
    assert shoal is not None
    nbytes = args.mib << 20
    up_args = ("--shared-agent-user",) if args.shared_agent_user else ()
    with shoal_fleet(shoal, root, 2, deadline, capacity=50, up_args=up_args) as fleet:

        async def go() -> None:
            async with fleet_client(fleet, timeout=120) as client:
                await _store(client, 1 << 20, 2)  # warm-up
                single: list[float] = []
                parallel: list[float] = []
                reads: list[float] = []
                for _ in range(args.runs):
                    took, ids = await _store(client, nbytes, 1)
                    single.append(took)
                    reads.append(await _read(client, ids[0], nbytes))
                    took, more = await _store(client, nbytes // args.parallel, args.parallel)
                    parallel.append(took)
                    for sid in ids + more:
                        await client.remove(sid)
                rows.append(_row("output-store", 1, single, nbytes))
                rows.append(_row("output-store-parallel", args.parallel, parallel, nbytes))
                rows.append(_row("output-read", 1, reads, nbytes))

        asyncio.run(go())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "the shared agent user" if args.shared_agent_user else "node identities"
    notes = (f"Fleet: `shoal up --agents 2 --capacity 50 --port 0` with {mode}; {args.mib} MiB "
             f"per run, {args.runs} runs; parallel = {args.parallel} sessions sharing it.\n")
    stem = "output-shared" if args.shared_agent_user else "output"
    return run_main(stem, "shoal session output throughput", COLUMNS, notes,
                    lambda root, deadline, rows: bench(args, root, deadline, rows),
                    args.budget, args.out, "shoal-output-")


if __name__ == "__main__":
    sys.exit(main())
