"""A customer session's `session_token` against a profile's `token`, side by side.

One daemon (a real process, against the emulator) with a profile and an app; one
customer logged in. Both requests are answered from memory on the reactor's path; the
same load generator (loadgen.py: closed loop, one request in flight per connection)
drives both, interleaved within each repetition, and the ratio is the median of the
ratios measured in the same slot. The goal: a session token within 1.2x of a profile
token at 64 connections.

    .venv/bin/python -m benchmarks.session_tokens [REPEAT]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgpack

from tests.support import DEMO_PASSWORD, DEMO_USER, DaemonProcess, EmulatorProcess, write_config

from .loadgen import broker_token_request, frame, run_load

CONNECTIONS = (1, 64)


def run(repeat: int = 3, duration: float = 2.0, warmup: float = 0.5) -> list[dict[str, Any]]:
    from geins_broker_client import Client

    with tempfile.TemporaryDirectory(prefix="gb-", dir="/tmp") as tmp:
        work = Path(tmp)
        emulator = EmulatorProcess()
        sock = work / "b.sock"
        config = write_config(
            work / "c.toml", emulator.url, sock, work / "state", apps={"shop": {}}
        )
        daemon = DaemonProcess(config, work)
        try:
            with Client(sock) as client:
                client.login(DEMO_USER, DEMO_PASSWORD)
                handle = client.session_login("shop", DEMO_USER, DEMO_PASSWORD).handle
            requests = {
                "token": broker_token_request(),
                "session_token": frame(
                    msgpack.packb({"id": 1, "op": "session_token", "app": "shop", "handle": handle})
                ),
            }
            runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for _ in range(repeat):
                for connections in CONNECTIONS:
                    for name, request in requests.items():
                        result = run_load(
                            str(sock),
                            request,
                            connections,
                            duration=duration,
                            warmup=warmup,
                            workers=1,
                            server_pid=daemon.process.pid,
                        )
                        if result["errors"]:
                            raise RuntimeError(f"{name}: {result['error_samples']}")
                        runs.setdefault((name, connections), []).append(result)
        finally:
            daemon.close()
            emulator.stop()
    rows = []
    for connections in CONNECTIONS:
        profile, session = runs["token", connections], runs["session_token", connections]
        rows.append(
            {
                "connections": connections,
                "token_rps": statistics.median(r["rps"] for r in profile),
                "session_token_rps": statistics.median(r["rps"] for r in session),
                "ratio": statistics.median(
                    p["rps"] / s["rps"] for p, s in zip(profile, session, strict=True)
                ),
                "token_p50_us": statistics.median(r["p50_us"] for r in profile),
                "session_token_p50_us": statistics.median(r["p50_us"] for r in session),
                # The daemon's CPU per answer: the figure a busy shared machine disturbs
                # least (throughput there depends on who else gets the cores).
                "token_cpu_us": statistics.median(_cpu_us(r) for r in profile),
                "session_token_cpu_us": statistics.median(_cpu_us(r) for r in session),
                # Per slot (the two measured one after the other): median and spread.
                "cpu_ratios": sorted(
                    _cpu_us(s) / _cpu_us(p) for p, s in zip(profile, session, strict=True)
                ),
            }
        )
    return rows


def _cpu_us(result: dict[str, Any]) -> float:
    return float(result["server_cpu"]) / float(result["rps"]) * 1e6


def main() -> None:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for row in run(repeat):
        print(
            f"{row['connections']:>4} connections: token {row['token_rps']:,.0f}/s "
            f"(p50 {row['token_p50_us']:.0f} us), session_token {row['session_token_rps']:,.0f}/s "
            f"(p50 {row['session_token_p50_us']:.0f} us); token/session_token {row['ratio']:.2f}x; "
            f"daemon CPU per answer {row['token_cpu_us']:.1f} / {row['session_token_cpu_us']:.1f} us"
        )


if __name__ == "__main__":
    main()
