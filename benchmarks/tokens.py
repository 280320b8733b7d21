"""Token throughput and latency: the daemon against ssh-agent, side by side.

Both answer a one-frame request from memory over a Unix socket: the daemon its
`token` op, ssh-agent its identities request. The same load generator (benchmarks/
loadgen.py: separate processes, one request in flight per connection) drives both,
interleaved within each repetition so that machine noise hits both alike; the
figures are medians over the repetitions, and each ratio is the median of the ratios
measured in the same time slot.

ssh-agent runs twice: empty (a 9-byte answer) and holding one RSA-4096 key (a
~560-byte answer, about the size of the daemon's ~700-byte token answer). With
`baseline`, the daemon of that git revision (exported with `git archive`) runs in the
same slots too, so before and after are compared side by side. With `refresh_every`,
each daemon is asked to rotate its profile that often throughout (a refresh at Geins
and a state-file write on the daemon's event loop), to see the token path's latency
while the daemon has other work.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time
from collections.abc import Iterator
from typing import Any

from .fleet import fleet
from .loadgen import broker_token_request, run_load, ssh_agent, ssh_agent_request
from .metrics_cost import exported

CONNECTIONS = (1, 8, 64, 512)


def _refresh_forever(socket_path: str, interval: float, counter: Any) -> None:
    """Ask the daemon to rotate `default` every `interval` seconds (a refresh at Geins,
    the state file written): the trio thread's own work while tokens are served."""
    from geins_broker_client import Client

    with Client(socket_path, timeout=10) as client:
        while True:
            started = time.monotonic()
            client.refresh("default")
            with counter.get_lock():
                counter.value += 1
            time.sleep(max(0.0, interval - (time.monotonic() - started)))


@contextlib.contextmanager
def refreshing(socket_paths: list[str], interval: float) -> Iterator[list[Any]]:
    """One process per daemon rotating its `default` profile every `interval` s."""
    ctx = multiprocessing.get_context("spawn")
    counters = [ctx.Value("i", 0) for _ in socket_paths]
    procs = [
        ctx.Process(target=_refresh_forever, args=(path, interval, counter), daemon=True)
        for path, counter in zip(socket_paths, counters, strict=True)
    ]
    for proc in procs:
        proc.start()
    try:
        yield counters
    finally:
        for proc in procs:
            proc.kill()
            proc.join()


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def run(
    repeat: int = 3,
    duration: float = 2.0,
    warmup: float = 0.5,
    baseline: str | None = None,
    refresh_every: float | None = None,
) -> dict[str, Any]:
    servers: dict[str, dict[int, list[dict[str, Any]]]] = {}
    with contextlib.ExitStack() as stack:
        daemon = stack.enter_context(fleet(1))
        targets = {"geins-broker": (str(daemon.socket), broker_token_request(), daemon.pid)}
        if baseline is not None:
            before = stack.enter_context(fleet(1, source=stack.enter_context(exported(baseline))))
            targets[f"geins-broker {baseline}"] = (
                str(before.socket),
                broker_token_request(),
                before.pid,
            )
        empty = stack.enter_context(ssh_agent())
        keyed = stack.enter_context(ssh_agent(with_key="rsa"))
        targets["ssh-agent"] = (empty.socket_path, ssh_agent_request(), empty.pid)
        targets["ssh-agent (RSA key)"] = (keyed.socket_path, ssh_agent_request(), keyed.pid)
        refreshes: list[Any] = []
        if refresh_every is not None:
            daemons = [path for name, (path, _, _) in targets.items() if name.startswith("geins")]
            refreshes = stack.enter_context(refreshing(daemons, refresh_every))
            time.sleep(1.0)  # the refreshers connected and rotating before the first slot
        started = time.monotonic()
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
        refresh_rates = [c.value / (time.monotonic() - started) for c in refreshes]
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
                # CPU time per answer: steadier on a shared VM than throughput.
                "cpu_us": statistics.median(
                    r["server_cpu"] * 1e6 / r["rps"] for r in runs[connections]
                ),
            }
        for name in ("ssh-agent", "ssh-agent (RSA key)"):
            paired = [
                b["rps"] / a["rps"] for b, a in zip(broker, servers[name][connections], strict=True)
            ]
            row[f"ratio vs {name}"] = statistics.median(paired)
            row[f"ratio vs {name} (range)"] = [min(paired), max(paired)]
        rows.append(row)
    return {
        "repeat": repeat,
        "duration": duration,
        "baseline": baseline,
        "refresh_every": refresh_every,
        "refresh_rates": refresh_rates,
        "rows": rows,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        "| connections | geins-broker req/s | p50 / p99 µs | CPU µs/req | ssh-agent req/s "
        "| p50 / p99 µs | CPU µs/req | ratio (range) | ssh-agent + RSA key req/s | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        b, a, k = row["geins-broker"], row["ssh-agent"], row["ssh-agent (RSA key)"]
        low, high = row["ratio vs ssh-agent (range)"]
        lines.append(
            f"| {row['connections']} | {b['rps']:,.0f} | {b['p50_us']:.0f} / {b['p99_us']:,.0f} "
            f"| {b['cpu_us']:.2f} | {a['rps']:,.0f} | {a['p50_us']:.0f} / {a['p99_us']:,.0f} "
            f"| {a['cpu_us']:.2f} | {row['ratio vs ssh-agent']:.2f} ({low:.2f}-{high:.2f}) "
            f"| {k['rps']:,.0f} | {row['ratio vs ssh-agent (RSA key)']:.2f} |"
        )
    baseline = result.get("baseline")
    if baseline is None:
        return "\n".join(lines)
    lines += [
        "",
        f"| connections | {baseline} req/s | p50 / p99 µs | CPU µs/req | ratio to ssh-agent "
        f"| now / {baseline} req/s | CPU µs/req, now / {baseline} |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        then, now = row[f"geins-broker {baseline}"], row["geins-broker"]
        lines.append(
            f"| {row['connections']} | {then['rps']:,.0f} | {then['p50_us']:.0f} / "
            f"{then['p99_us']:,.0f} | {then['cpu_us']:.2f} "
            f"| {then['rps'] / row['ssh-agent']['rps']:.2f} | {now['rps'] / then['rps']:.2f} "
            f"| {now['cpu_us'] / then['cpu_us']:.2f} |"
        )
    return "\n".join(lines)
