"""Token throughput and latency: the daemon against ssh-agent, side by side.

Both answer a one-frame request from memory over a Unix socket: the daemon its
`token` op, ssh-agent its identities request. The same load generator (benchmarks/
loadgen.py: separate processes, one request in flight per connection) drives both,
interleaved within each repetition so that machine noise hits both alike; the
figures are medians over the repetitions, and each ratio is the median of the ratios
measured in the same time slot.

ssh-agent runs twice: empty (a 9-byte answer) and holding one RSA-4096 key (a
~560-byte answer, about the size of the daemon's ~700-byte token answer).
"""

from __future__ import annotations

import statistics
from typing import Any

from .fleet import fleet
from .loadgen import broker_token_request, run_load, ssh_agent, ssh_agent_request

CONNECTIONS = (1, 8, 64, 512)


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def run(repeat: int = 3, duration: float = 2.0, warmup: float = 0.5) -> dict[str, Any]:
    servers: dict[str, dict[int, list[dict[str, Any]]]] = {}
    with fleet(1) as daemon, ssh_agent() as empty, ssh_agent(with_key="rsa") as keyed:
        targets = {
            "geins-broker": (str(daemon.socket), broker_token_request(), daemon.pid),
            "ssh-agent": (empty.socket_path, ssh_agent_request(), empty.pid),
            "ssh-agent (RSA key)": (keyed.socket_path, ssh_agent_request(), keyed.pid),
        }
        for _ in range(repeat):
            for connections in CONNECTIONS:
                for name, (path, request, pid) in targets.items():
                    result = run_load(
                        path,
                        request,
                        connections,
                        duration=duration,
                        warmup=warmup,
                        workers=1,
                        server_pid=pid,
                    )
                    if result["errors"]:
                        raise RuntimeError(f"{name} at {connections}: {result['error_samples']}")
                    servers.setdefault(name, {}).setdefault(connections, []).append(result)
    rows = []
    for connections in CONNECTIONS:
        broker = servers["geins-broker"][connections]
        row: dict[str, Any] = {"connections": connections}
        for name, runs in servers.items():
            row[name] = {
                "rps": _median(runs[connections], "rps"),
                "p50_us": _median(runs[connections], "p50_us"),
                "p99_us": _median(runs[connections], "p99_us"),
                "server_cpu": _median(runs[connections], "server_cpu"),
            }
        for name in ("ssh-agent", "ssh-agent (RSA key)"):
            paired = [
                b["rps"] / a["rps"] for b, a in zip(broker, servers[name][connections], strict=True)
            ]
            row[f"ratio vs {name}"] = statistics.median(paired)
            row[f"ratio vs {name} (range)"] = [min(paired), max(paired)]
        rows.append(row)
    return {"repeat": repeat, "duration": duration, "rows": rows}


def table(result: dict[str, Any]) -> str:
    lines = [
        "| connections | geins-broker req/s | p50 / p99 µs | ssh-agent req/s | p50 / p99 µs | ratio | "
        "ssh-agent + RSA key req/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        b, a, k = row["geins-broker"], row["ssh-agent"], row["ssh-agent (RSA key)"]
        lines.append(
            f"| {row['connections']} | {b['rps']:,.0f} | {b['p50_us']:.0f} / {b['p99_us']:.0f} "
            f"| {a['rps']:,.0f} | {a['p50_us']:.0f} / {a['p99_us']:.0f} | {row['ratio vs ssh-agent']:.2f} "
            f"| {k['rps']:,.0f} | {row['ratio vs ssh-agent (RSA key)']:.2f} |"
        )
    return "\n".join(lines)
