"""Baseline matrix: ssh-agent (no key / one key) vs a bare trio echo server.

Starts the three servers once, then for every repetition runs every (server, C, P)
combination, interleaved so slow drift on the machine hits all servers alike.  Prints
per-run rows, then a summary (median over repetitions, with min-max spread of
req/s) and echo/ssh-agent throughput ratios.  Also probes ssh-agent's concurrent
connection limit.

    .venv/bin/python -m benchmarks.agent_vs_echo --repeat 3 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import loadgen

HERE = Path(__file__).resolve().parent


def start_echo(path: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "echo_trio.py"), "--socket", path],
        stdin=subprocess.DEVNULL,
    )
    loadgen.wait_for_socket(path, proc)
    return proc


def probe_agent_limit() -> dict[str, int]:
    """ssh-agent serves clients while open fds < RLIMIT_NOFILE - 10; show it."""
    req = loadgen.ssh_agent_request()
    out = {}
    with loadgen.ssh_agent(nofile=64) as agent:
        out["nofile=64, 100 clients answered"] = loadgen.probe_concurrent(
            agent.socket_path, req, 100
        )
    with loadgen.ssh_agent() as agent:
        out["default nofile, 512 clients answered"] = loadgen.probe_concurrent(
            agent.socket_path, req, 512
        )
        out["default nofile, 2000 clients answered"] = loadgen.probe_concurrent(
            agent.socket_path, req, 2000, timeout=5
        )
    return out


def _ratio_line(runs: list[dict[str, Any]], c: int, p: int, a: str, b: str) -> str:
    """Median and min-max of a/b req/s, paired per repetition (same time slot)."""
    pairs: dict[int, dict[str, float]] = {}
    for r in runs:
        if r["connections"] == c and r["workers"] == p and r["server"] in (a, b):
            pairs.setdefault(r["rep"], {})[r["server"]] = r["rps"]
    ratios = [v[a] / v[b] for v in pairs.values() if a in v and b in v and v[b]]
    if not ratios:
        return f"{a}/{b}=n/a"
    return f"{a}/{b}={statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def summarize(
    runs: list[dict[str, Any]], servers: list[str], conns: list[int], workers: list[int]
) -> None:
    configs = sorted({(min(p, c), c) for p in workers for c in conns})
    print("\nsummary: median over repetitions (req/s min-max)")
    print(f"{'server':<12} {'C':>4} {'P':>2} {'req/s':>8} {'spread':>17} {'p50us':>8} {'p99us':>8}")
    for p, c in configs:
        for name in servers:
            rs = [
                r
                for r in runs
                if r["server"] == name and r["connections"] == c and r["workers"] == p
            ]
            rps = [r["rps"] for r in rs]
            print(
                f"{name:<12} {c:>4} {p:>2} {statistics.median(rps):>8.0f} "
                f"{min(rps):>8.0f}-{max(rps):<8.0f} "
                f"{statistics.median(r['p50_us'] for r in rs):>8.1f} "
                f"{statistics.median(r['p99_us'] for r in rs):>8.1f}"
            )
    print("\nthroughput ratios, paired per repetition: median (min-max)")
    for p, c in configs:
        print(
            f"C={c:<4} P={p}  "
            + "  ".join(
                _ratio_line(runs, c, p, a, b)
                for a, b in (
                    ("trio-echo", "agent-empty"),
                    ("trio-echo", "agent-1key"),
                    ("agent-1key", "agent-empty"),
                )
            )
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--duration", type=float, default=2.5)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--json-out", help="write all runs here")
    ap.add_argument("--skip-probe", action="store_true")
    args = ap.parse_args()

    if not args.skip_probe:
        for k, v in probe_agent_limit().items():
            print(f"ssh-agent limit probe: {k}: {v}")

    tmp = tempfile.mkdtemp(prefix="agent-vs-echo-")
    echo_path = os.path.join(tmp, "echo.sock")
    agent_empty = loadgen.start_ssh_agent()
    agent_key = loadgen.start_ssh_agent(with_key=True)
    echo = start_echo(echo_path)
    req = loadgen.ssh_agent_request()
    servers = {
        "agent-empty": (agent_empty.socket_path, agent_empty.pid),
        "agent-1key": (agent_key.socket_path, agent_key.pid),
        "trio-echo": (echo_path, echo.pid),
    }
    runs: list[dict[str, Any]] = []
    try:
        print(f"{'server':<12}" + loadgen.HEADER)
        for _rep in range(args.repeat):  # interleaved: drift hits all servers
            for p in args.workers:
                for c in args.connections:
                    if p > c and p != min(args.workers):
                        continue  # P is capped at C: same config as the smallest P
                    for name, (path, pid) in servers.items():
                        r = loadgen.run_load(
                            path,
                            req,
                            c,
                            args.duration,
                            args.warmup,
                            p,
                            expect=b"\x0c",
                            server_pid=pid,
                        )
                        r["server"] = name
                        r["rep"] = _rep
                        runs.append(r)
                        print(f"{name:<12}" + loadgen._fmt_row(r), flush=True)
    finally:
        agent_empty.stop()
        agent_key.stop()
        loadgen.stop_process(echo)
        shutil.rmtree(tmp, ignore_errors=True)

    summarize(runs, list(servers), args.connections, args.workers)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
