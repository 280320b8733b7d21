"""Fleet mode (docs/cluster.md): real daemons sharing one redis-server and the emulator.

- refreshes: upstream refreshes per rotation with 1, 3 and 5 nodes (goal: exactly 1),
  from the emulator's request count and the rotation count it writes into each bearer;
- propagation: from a rotation committed on one node to every node serving the new
  token (goal: p99 under 50 ms), measured as the spread between the first and the last
  node's watch event for each new token (the committing node announces first);
- throughput: token requests from memory on a fleet node against a single-host daemon
  (goal: within 5 %), interleaved runs.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from geins_broker_client._sync.client import Client as BlockingClient
from geins_broker_client.trio_client import TrioClient
from tests.fleet.support import Fleet, RedisServer, fleet_env, jti_rotations
from tests.support import DaemonProcess, wait_until, write_config

from .loadgen import broker_token_request, run_load

TOKEN_TTL = 6.0
REFRESH_AT = 0.5


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gb-b-", dir="/tmp") as name:
        yield Path(name)


def _refresh_requests(fleet: Fleet) -> int:
    return int(fleet.emulator.control("GET", "stats")["counts"].get("GET /login", 0))


def _same_everywhere(fleet: Fleet) -> dict[str, str] | None:
    try:
        tokens = [fleet.tokens(i) for i in sorted(fleet.daemons)]
    except Exception:
        return None
    return tokens[0] if all(t == tokens[0] for t in tokens) else None


def refreshes(
    nodes: tuple[int, ...] = (1, 3, 5), profiles: int = 20, seconds: float = 15.0
) -> dict[str, Any]:
    rows = []
    for count in nodes:
        with _workdir() as work:
            redis = RedisServer(work)
            try:
                with fleet_env(work, token_ttl=TOKEN_TTL) as emulator:
                    names = tuple(f"p{i}" for i in range(profiles))
                    fleet = Fleet(
                        work,
                        emulator,
                        redis.url,
                        nodes=count,
                        profiles=names,
                        refresh_at=REFRESH_AT,
                    )
                    try:
                        fleet.login_all(0)
                        start = wait_until(lambda: _same_everywhere(fleet), 15, "settled")  # noqa: B023 - called at once
                        before = _refresh_requests(fleet)
                        time.sleep(seconds)
                        end = wait_until(lambda: _same_everywhere(fleet), 15, "settled")  # noqa: B023 - called at once
                        rotations = sum(
                            jti_rotations(end[p])[1] - jti_rotations(start[p])[1] for p in names
                        )
                        made = _refresh_requests(fleet) - before
                    finally:
                        fleet.close()
            finally:
                redis.stop()
        rows.append(
            {
                "nodes": count,
                "profiles": profiles,
                "seconds": seconds,
                "rotations": rotations,
                "refreshes": made,
                "per_rotation": made / rotations if rotations else float("nan"),
            }
        )
    return {"rows": rows}


async def _watch_spreads(
    sockets: list[Path], profiles: tuple[str, ...], seconds: float
) -> list[float]:
    seen: dict[tuple[str, str], list[float]] = {}

    async def watch(path: Path, profile: str) -> None:
        async with TrioClient(path) as client:
            first = True
            async for event in client.watch(profile):
                if event.token is None:
                    continue
                if first:  # the token already held when the watch began
                    first = False
                    continue
                seen.setdefault((profile, event.token.token), []).append(time.perf_counter())

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for path in sockets:
                for profile in profiles:
                    nursery.start_soon(watch, path, profile)
    return [
        (max(times) - min(times)) * 1000 for times in seen.values() if len(times) == len(sockets)
    ]


def propagation(nodes: int = 3, profiles: int = 20, seconds: float = 30.0) -> dict[str, Any]:
    with _workdir() as work:
        redis = RedisServer(work)
        try:
            with fleet_env(work, token_ttl=TOKEN_TTL) as emulator:
                names = tuple(f"p{i}" for i in range(profiles))
                fleet = Fleet(
                    work, emulator, redis.url, nodes=nodes, profiles=names, refresh_at=REFRESH_AT
                )
                try:
                    fleet.login_all(0)
                    wait_until(lambda: _same_everywhere(fleet), 15, "settled")
                    sockets = [fleet.socket(i) for i in range(nodes)]
                    spreads = sorted(trio.run(_watch_spreads, sockets, names, seconds))
                finally:
                    fleet.close()
        finally:
            redis.stop()
    if not spreads:
        raise RuntimeError("no rotation was seen by every node")
    return {
        "nodes": nodes,
        "profiles": profiles,
        "rotations": len(spreads),
        "p50_ms": statistics.median(spreads),
        "p99_ms": spreads[min(len(spreads) - 1, int(len(spreads) * 0.99))],
        "max_ms": spreads[-1],
    }


def throughput(repeat: int = 5, duration: float = 2.0, connections: int = 8) -> dict[str, Any]:
    """The same load on a single-host daemon and on node n0 of a 3-node fleet, runs
    interleaved; bearers live 900 s, so neither rotates while measured."""
    with _workdir() as work:
        redis = RedisServer(work)
        try:
            with fleet_env(work, token_ttl=900) as emulator:
                fleet = Fleet(work, emulator, redis.url, nodes=3)
                single_dir = work / "single"
                single_dir.mkdir()
                config = write_config(
                    single_dir / "config.toml", emulator.url, single_dir / "s", single_dir / "state"
                )
                single = DaemonProcess(config, single_dir)
                try:
                    fleet.login_all(0)
                    wait_until(lambda: _same_everywhere(fleet), 15, "settled")
                    with BlockingClient(str(single_dir / "s")) as client:
                        client.login(DEMO_USER, DEMO_PASSWORD)
                    targets = {
                        "single host": (str(single_dir / "s"), single.process.pid),
                        "fleet node": (str(fleet.socket(0)), fleet.daemons[0].process.pid),
                    }
                    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
                    for _ in range(repeat):
                        for name, (path, pid) in targets.items():
                            result = run_load(
                                path,
                                broker_token_request(),
                                connections,
                                duration=duration,
                                warmup=0.5,
                                workers=1,
                                server_pid=pid,
                            )
                            if result["errors"]:
                                raise RuntimeError(f"{name}: {result['error_samples']}")
                            runs[name].append(result)
                finally:
                    single.close()
                    fleet.close()
        finally:
            redis.stop()
    ratios = [
        f["rps"] / s["rps"] for f, s in zip(runs["fleet node"], runs["single host"], strict=True)
    ]
    return {
        "repeat": repeat,
        "duration": duration,
        "connections": connections,
        "single_rps": statistics.median(r["rps"] for r in runs["single host"]),
        "fleet_rps": statistics.median(r["rps"] for r in runs["fleet node"]),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
    }


def table(result: dict[str, Any]) -> str:
    out = [
        "**Fleet mode** (real daemons, one redis-server, the emulator; bearers of 6 s rotated at half life):",
        "",
    ]
    if "refreshes" in result:
        out += [
            "| nodes | profiles | seconds | rotations | refreshes at Geins | per rotation |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['nodes']} | {r['profiles']} | {r['seconds']:g} | {r['rotations']} | {r['refreshes']} | {r['per_rotation']:.3f} |"
            for r in result["refreshes"]["rows"]
        ]
        out.append("")
    if "propagation" in result:
        p = result["propagation"]
        out.append(
            f"Commit on one node to all {p['nodes']} serving it: p50 {p['p50_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, "
            f"max {p['max_ms']:.2f} ms over {p['rotations']} rotations ({p['profiles']} profiles)."
        )
    if "throughput" in result:
        t = result["throughput"]
        out.append(
            f"Token path, {t['connections']} connections: single host {t['single_rps']:,.0f} req/s, fleet node "
            f"{t['fleet_rps']:,.0f} req/s: ratio {t['ratio']:.3f} (range {t['ratio_range'][0]:.3f}-{t['ratio_range'][1]:.3f}, "
            f"median of {t['repeat']} interleaved runs of {t['duration']:g} s)."
        )
    return "\n".join(out)
