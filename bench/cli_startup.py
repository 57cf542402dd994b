"""The start-up of ``shoal run``: ``shoal run -n node-1 -- true`` on a local fleet, this tree
against another revision's ``src/`` (default ``main``), runs interleaved so that a noisy machine
weighs on both alike; and the modules each imports.

    python -m bench.cli_startup [--against REV] [--runs N]

It starts its own ``shoal up --agents 1`` in a temporary SHOAL_HOME and stops it at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import sys; sys.path.insert(0, {src!r}); "
         "sys.argv = ['shoal', 'run', '-n', 'node-1', '--', 'true']; "
         "from shoal.cli.main import main; main()")


def _up(home: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SHOAL_HOME": str(home)}
    log = open(home / "up.log", "wb")  # noqa: SIM115 - the child owns it
    shoal = str(Path(sys.executable).parent / "shoal")
    up = subprocess.Popen([shoal, "up", "--agents", "1", "--port", "0"], env=env, stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while "Ctrl-C stops everything." not in (home / "up.log").read_text():
        if up.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"shoal up did not start:\n{(home / 'up.log').read_text()}")
        time.sleep(0.1)
    while subprocess.run([sys.executable, "-c", PROBE.format(src=str(REPO_ROOT / "src"))],
                         env=env, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit("node-1 did not come up")
        time.sleep(0.2)
    return up


def _modules(src: str, env: dict[str, str]) -> int:
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", PROBE.format(src=src)],
                       env=env, capture_output=True, text=True, check=True)
    return len(re.findall(r"^import time:\s+\d", r.stderr, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default="main", help="the revision to compare with")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="shoal-startup-") as tmp:
        home, other = Path(tmp) / "home", Path(tmp) / "other"
        home.mkdir(mode=0o700)
        other.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", args.against, "src"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive, check=True)
        env = {**os.environ, "SHOAL_HOME": str(home)}
        srcs = {args.against: str(other / "src"), "this tree": str(REPO_ROOT / "src")}
        up = _up(home)
        try:
            times: dict[str, list[float]] = {k: [] for k in srcs}
            for _ in range(args.runs):
                for name, src in srcs.items():
                    t = time.perf_counter()
                    subprocess.run([sys.executable, "-c", PROBE.format(src=src)], env=env,
                                   check=True)
                    times[name].append((time.perf_counter() - t) * 1000)
            for name, ts in times.items():
                print(f"{name:>12}: median {statistics.median(ts):6.1f} ms, min "
                      f"{min(ts):6.1f} ms over {args.runs} runs; "
                      f"{_modules(srcs[name], env)} modules imported")
        finally:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(30)


if __name__ == "__main__":
    main()
