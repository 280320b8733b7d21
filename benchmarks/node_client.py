"""The Node client beside the Python client, on the same daemon in the same run.

Both measure a client library, not the daemon: `token()` round trips one after another on
one connection (p50/p99), then `token()` over 8 connections at once in one process (one
client per connection, one request in flight on each: Python's asyncio client, Node's
BrokerClient, each on its own event loop), and the Node TokenCache's answer from memory.
The Node half is clients/node/bench/bench.ts, built by `npm run pretest`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from geins_broker_client import Client
from geins_broker_client.asyncio_client import AsyncioClient

from .fleet import fleet

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


def _python_round_trips(socket: str, seconds: float) -> dict[str, float]:
    with Client(socket) as client:
        warm = time.perf_counter() + 0.3
        while time.perf_counter() < warm:
            client.token()
        samples: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            client.token()
            samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[min(len(samples) - 1, int(0.99 * len(samples)))],
        "count": len(samples),
    }


async def _python_eight(socket: str, seconds: float, connections: int = 8) -> dict[str, float]:
    clients = [AsyncioClient(socket) for _ in range(connections)]
    for client in clients:
        await client.token()
    done = 0
    end = time.perf_counter() + seconds

    async def drive(client: AsyncioClient) -> None:
        nonlocal done
        while time.perf_counter() < end:
            await client.token()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(drive(c) for c in clients))
    elapsed = time.perf_counter() - start
    for client in clients:
        await client.aclose()
    return {"rps": done / elapsed}


def _node(socket: str, seconds: float) -> dict[str, Any]:
    subprocess.run(["npm", "run", "pretest", "--silent"], cwd=NODE_DIR, check=True)
    out = subprocess.run(
        ["node", "build-test/bench/bench.js", socket, f"{seconds:g}"],
        cwd=NODE_DIR,
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run(repeat: int = 3, duration: float = 2.0) -> dict[str, Any]:
    if shutil.which("node") is None:
        return {"skipped": "node not found"}
    runs: list[dict[str, Any]] = []
    with fleet(1) as daemon:
        socket = str(daemon.socket)
        for _ in range(repeat):
            # Interleaved, so that machine noise hits both alike.
            python = {
                "round_trip": _python_round_trips(socket, duration),
                "eight": asyncio.run(_python_eight(socket, duration)),
            }
            runs.append({"python": python, "node": _node(socket, duration)})

    def median(side: str, part: str, key: str) -> float:
        return float(statistics.median(r[side][part][key] for r in runs))

    result: dict[str, Any] = {
        "repeat": repeat,
        "duration": duration,
        "node_version": runs[0]["node"]["node"],
    }
    for side in ("python", "node"):
        result[side] = {
            "p50_us": median(side, "round_trip", "p50_us"),
            "p99_us": median(side, "round_trip", "p99_us"),
            "rps_8": median(side, "eight", "rps"),
        }
    result["node"]["cache_hit_ns"] = median("node", "cache", "hit_ns")
    result["p50_ratio"] = result["node"]["p50_us"] / result["python"]["p50_us"]
    return result


def table(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"(Node client not measured: {result['skipped']})"
    p, n = result["python"], result["node"]
    return "\n".join(
        [
            "| client | token() p50 / p99 µs, 1 connection | token() req/s, 8 connections |",
            "|---|---:|---:|",
            f"| Python (blocking; asyncio at 8) | {p['p50_us']:.0f} / {p['p99_us']:.0f} | {p['rps_8']:,.0f} |",
            f"| Node {result['node_version']} | {n['p50_us']:.0f} / {n['p99_us']:.0f} | {n['rps_8']:,.0f} |",
            "",
            f"Node p50 / Python p50: {result['p50_ratio']:.2f}x. Node TokenCache hit: "
            f"{n['cache_hit_ns']:.0f} ns.",
        ]
    )
