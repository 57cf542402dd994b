"""Service proxy speed: requests/s and added latency through ``/s/NAME/`` on the services
listener (proxy mode), against direct requests to a replica, with Debian's nginx proxying the
same replicas.

Run from the repository root with `python -m bench.proxy` (bench.run runs it as one of its
EXTRA_BENCHMARKS). It starts a private `shoal up --agents 2 --port 0` in a temporary
SHOAL_HOME, a 2-replica proxy-mode service of bench/fast_replica.py (an asyncio HTTP/1.1
server answering its name: cheap, so the replicas are not what is measured), and nginx
(one worker, keep-alive upstream pool) in front of the same two replicas. Load comes from
wrk (Debian's package; installed with nginx by apt-get when missing). Everything listens on
127.0.0.1 and the run stops itself within its budget (BENCH_DEADLINE_S, else --budget).

Workloads, for each of direct (one replica), shoal-proxy and nginx:

- proxy-latency: one connection, one request at a time, for --duration seconds: p50 and p99
  of wrk's latency distribution; ``added_p50_ms``/``added_p99_ms`` subtract direct's.
- proxy-throughput: --connections keep-alive connections (8 and 32 by default) over 2 wrk
  threads: requests/s, and p50/p99 per request under that load.

The load generator, the controller, NATS, the agents, nginx and the replicas all share this
machine's CPUs (``cpus`` in each row): the numbers are for everything on one host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
REPLICA = REPO / "bench" / "fast_replica.py"
PACKAGES = {"nginx-light": Path("/usr/sbin/nginx"), "wrk": Path("/usr/bin/wrk")}
NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    upstream replicas {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout;
        }}
    }}
}}
"""


def log(message: str) -> None:
    print(f"[bench.proxy {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument(
        "--connections", default="8,32", help="comma list of connection counts for throughput"
    )
    p.add_argument("--rounds", type=int, default=2, help="rounds (the best of each is kept)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("BENCH_DEADLINE_S", 240)))
    return p.parse_args(argv)


def ensure_packages() -> None:
    missing = [pkg for pkg, marker in PACKAGES.items() if not marker.exists()]
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing Debian packages: {' '.join(missing)}")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        raw = resp.read()
        return json.loads(raw) if raw else None


def start_fleet(home: Path, deadline: float) -> tuple[subprocess.Popen[bytes], str, str]:
    shoal = os.environ.get("SHOAL_BIN") or str(Path(sys.executable).parent / "shoal")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env["SHOAL_HOME"] = str(home)
    log_path = home.parent / "up.log"
    with open(log_path, "wb") as out:
        up = subprocess.Popen(
            [shoal, "up", "--agents", "2", "--port", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
    while time.monotonic() < deadline:
        found = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", log_path.read_text())
        if found:
            return up, found.group(1), found.group(2)
        if up.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"shoal up did not start: {log_path.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not found:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def wrk(url: str, connections: int, threads: int, duration: float) -> dict[str, float]:
    res = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
    )
    out = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if res.returncode != 0 or rps is None:
        raise RuntimeError(f"wrk failed: {res.stderr or out}")
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rps.group(1)),
        "p50": _seconds(pct["50"]),
        "p99": _seconds(pct["99"]),
        "errors": float(errors.group(1)) if errors else 0.0,
        "socket_errors": 1.0 if socket_errors else 0.0,
    }


def bench(args: argparse.Namespace, root: Path, deadline: float) -> list[dict[str, Any]]:
    ensure_packages()
    up, url, token = start_fleet(root / "home", deadline)
    nginx: subprocess.Popen[bytes] | None = None
    try:
        api(
            url,
            token,
            "POST",
            "/api/v1/services",
            {
                "name": "bench",
                "command": [sys.executable, str(REPLICA)],
                "replicas": 2,
                "proxy": True,
                "check": "tcp",
                "interval": 1.0,
            },
        )
        while True:
            view = api(url, token, "GET", "/api/v1/services/bench")
            if view["up"] == 2:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replicas did not come up: {view}")
            time.sleep(0.2)
        replicas = [(r["host"], r["port"]) for r in view["replicas"]]
        port = free_port()
        nginx_root = root / "nginx"
        nginx_root.mkdir()
        servers = "\n".join(f"        server {h}:{p};" for h, p in replicas)
        (nginx_root / "nginx.conf").write_text(
            NGINX_CONF.format(root=nginx_root, servers=servers, port=port)
        )
        nginx = subprocess.Popen(
            ["nginx", "-p", str(nginx_root), "-c", str(nginx_root / "nginx.conf")],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        targets = {
            "direct": f"http://{replicas[0][0]}:{replicas[0][1]}/",
            "shoal-proxy": view["url"],  # the services listener's /s/bench/
            "nginx": f"http://127.0.0.1:{port}/",
        }
        for name, target in targets.items():  # warm up: pools, caches; and check it answers
            for _ in range(50):
                try:
                    with urllib.request.urlopen(target, timeout=5) as resp:
                        resp.read()
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise RuntimeError(f"{name} at {target} does not answer")
            wrk(target, 4, 1, 1)
        best: dict[tuple[str, str, int], dict[str, float]] = {}
        for rnd in range(args.rounds):
            for name, target in targets.items():
                loads = [("proxy-latency", 1, 1)] + [
                    ("proxy-throughput", int(c), 2) for c in args.connections.split(",") if c
                ]
                for workload, conns, threads in loads:
                    if time.monotonic() + args.duration + 15 > deadline:
                        log("budget reached; stopping early")
                        return rows(best, args)
                    log(f"round {rnd + 1}: {workload} {name}")
                    got = wrk(target, conns, threads, args.duration)
                    key = (workload, name, conns)
                    keep = best.get(key)
                    if keep is None or (
                        got["p50"] < keep["p50"]
                        if workload == "proxy-latency"
                        else got["rps"] > keep["rps"]
                    ):
                        best[key] = got
        return rows(best, args)
    finally:
        stop(nginx)
        try:
            api(url, token, "DELETE", "/api/v1/services/bench?deadline=0")
        except OSError:
            pass
        stop(up)


def rows(
    best: dict[tuple[str, str, int], dict[str, float]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    out = []
    direct = best.get(("proxy-latency", "direct", 1))
    for (workload, tool, conns), got in best.items():
        row: dict[str, Any] = {
            "workload": workload,
            "tool": tool,
            "n": conns,
            "runs": 1,
            "median_s": round(got["p50"], 7),
            "p99_s": round(got["p99"], 7),
            "rps": round(got["rps"], 1),
            "duration_s": args.duration,
            "non_2xx": int(got["errors"]),
            "cpus": os.cpu_count(),
            "status": "ok" if not got["errors"] else "partial",
        }
        if workload == "proxy-latency" and direct is not None:
            row["added_p50_ms"] = round((got["p50"] - direct["p50"]) * 1000, 3)
            row["added_p99_ms"] = round((got["p99"] - direct["p99"]) * 1000, 3)
        out.append(row)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + max(30.0, args.budget - 10)
    root = Path(tempfile.mkdtemp(prefix="shoal-bench-proxy-"))
    try:
        result = bench(args, root, deadline)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
