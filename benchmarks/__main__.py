"""Run the benchmarks and write benchmarks/results/latest.{json,md}.

python -m benchmarks                 # everything (about twenty minutes; sessions alone thirteen)
python -m benchmarks tokens cli      # some of: tokens node cli memory idle restore proxy metrics sealing cluster sessions
python -m benchmarks --quick         # fewer repetitions and shorter runs
python -m benchmarks metrics --baseline REV   # also against a revision without metrics
python -m benchmarks tokens --tokens-baseline REV   # the daemon of REV in the same slots
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from . import cluster, footprint, metrics_cost, node_client, proxy, sealing, sessions, tokens

RESULTS = Path(__file__).resolve().parent / "results"
ALL = (
    "tokens",
    "node",
    "cli",
    "memory",
    "idle",
    "restore",
    "proxy",
    "metrics",
    "sealing",
    "cluster",
    "sessions",
)


def markdown(results: dict[str, Any]) -> str:
    out = [f"Measured {results['when']} on {results['machine']}.", ""]
    if "tokens" in results:
        t = results["tokens"]
        out += [
            f"**Token requests from memory** (median of {t['repeat']} interleaved runs of {t['duration']:g} s "
            "per cell; one load process, one request in flight per connection):",
            "",
            tokens.table(t),
            "",
        ]
        if t.get("refresh_every") is not None:
            rates = ", ".join(f"{r:.1f}/s" for r in t["refresh_rates"])
            out += [
                f"Meanwhile each daemon rotated its profile every {t['refresh_every']:g} s ({rates}).",
                "",
            ]
    if "metrics" in results:
        m = results["metrics"]
        out += [
            f"**Metrics cost** ({m['connections']} connections, median of {m['repeat']} interleaved "
            f"runs of {m['duration']:g} s; `on` scraped every {m['scrape_every']:g} s, "
            f"{m['scrapes']} scrapes in all, and writing the textfile as often):",
            "",
            metrics_cost.table(m),
            "",
        ]
        c = m["scrape"]
        out += [
            f"**One scrape of {c['profiles']:,} profiles**: copied on the event loop in "
            f"{c['per_profile']['snapshot_ms']:.0f} ms (in chunks of 500 between checkpoints), "
            f"formatted in a worker thread in {c['per_profile']['render_ms']:,.0f} ms "
            f"({c['per_profile']['bytes'] / 2**20:.1f} MiB); with `per_profile = false` "
            f"{c['summed']['render_ms']:.0f} ms ({c['summed']['bytes']:,} bytes).",
            "",
        ]
        h = m["hot_path"]
        out += [
            f"**The count on the token path alone**: `Profile.token_frame` takes "
            f"{h['counted_ns']:.0f} ns with its `+= 1`, {h['uncounted_ns']:.0f} ns without "
            f"(median of {h['rounds']} alternated rounds of {h['calls']:,} calls): "
            f"{h['delta_ns']:+.0f} ns per answer (difference of the fastest rounds: "
            f"{h['min_delta_ns']:+.0f} ns).",
            "",
        ]
    if "node" in results:
        out += [
            "**The Node client beside the Python client** (same daemon, same run; median of "
            f"{results['node'].get('repeat', 0)} interleaved runs):",
            "",
            node_client.table(results["node"]),
            "",
        ]
    if "proxy" in results:
        p = results["proxy"]
        out += [
            f"**Merchant API proxy against nginx** (median of {p['repeat']} interleaved runs of "
            f"{p['duration']:g} s per cell; loopback TCP; the same stub behind both):",
            "",
            proxy.table(p),
            "",
        ]
    if "cli" in results:
        c = results["cli"]
        out += [
            f"**CLI**: `geins-broker token` takes {c['token_ms']:.1f} ms of wall time, `python -c pass` "
            f"{c['python_ms']:.1f} ms: {c['ratio']:.2f}x; installed by pip "
            f"{c['token_pip_ms']:.1f} ms: {c['ratio_pip']:.2f}x (median of {c['runs']} runs each).",
            "",
        ]
    if "memory" in results:
        rss = results["memory"]["rss_mib"]
        cells = ", ".join(f"{n} profiles {v:.1f} MiB" for n, v in rss.items())
        out += [f"**Memory** (RSS of the idle daemon, logged-in profiles): {cells}.", ""]
    if "idle" in results:
        i = results["idle"]
        out += [
            f"**Idle**: {i['cpu_seconds']:.3f} s of CPU over {i['seconds']:g} s with {i['profiles']} active "
            f"profiles ({i['cpu_percent']:.3f} %).",
            "",
        ]
    if "restore" in results:
        r = results["restore"]
        out += [
            f"**Restart with {r['profiles']:,} overdue sessions**: serving after {r['startup_s']:.1f} s, all "
            f"fresh after {r['all_fresh_s']:.1f} s ({r['refreshes']:,} refreshes, each held "
            f"{r['emulator_latency_s'] * 1000:g} ms by the emulator); at most {r['peak_in_flight']} in flight "
            f"at once (bound {r['bound']}); RSS then {r['rss_mib']:.1f} MiB.",
            "",
        ]
    if "sealing" in results:
        out += [sealing.table(results["sealing"]["rotation"], results["sealing"]["restart"]), ""]
    if "cluster" in results:
        out += [cluster.table(results["cluster"]), ""]
    if "sessions" in results:
        out += [
            "**Customer sessions** (benchmarks/sessions.py; load average "
            f"{results['sessions']['load']} at the start):",
            "",
            sessions.table(results["sessions"]),
            "",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument(
        "only", nargs="*", metavar="NAME", help=f"some of {', '.join(ALL)} (default: all)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, shorter runs")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="metrics: also measure the daemon of this git revision (one without metrics)",
    )
    parser.add_argument(
        "--tokens-baseline",
        metavar="REV",
        help="tokens: also measure the daemon as of git revision REV, in the same slots",
    )
    parser.add_argument(
        "--tokens-repeat",
        type=int,
        default=None,
        metavar="N",
        help="tokens: N interleaved slots per cell (3; 1 with --quick): more to steady the ratios",
    )
    parser.add_argument(
        "--tokens-refresh-every",
        metavar="SECONDS",
        type=float,
        help="tokens: rotate each daemon's profile every SECONDS meanwhile (a refresh load)",
    )
    parser.add_argument(
        "--proxy-baseline",
        metavar="REV",
        help="proxy: also measure the daemon as of git revision REV, in the same slots",
    )
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(ALL):
        parser.error(f"unknown benchmark {sorted(unknown)[0]!r}; choose from {', '.join(ALL)}")
    chosen = args.only or list(ALL)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    if "tokens" in chosen:
        results["tokens"] = tokens.run(
            repeat=args.tokens_repeat or (1 if args.quick else 3),
            duration=1.0 if args.quick else 2.0,
            baseline=args.tokens_baseline,
            refresh_every=args.tokens_refresh_every,
        )
    if "metrics" in chosen:
        results["metrics"] = metrics_cost.run(
            repeat=3 if args.quick else 15,
            duration=1.0,
            baseline=args.baseline,
        )
        results["metrics"]["scrape"] = metrics_cost.scrape_cost(1000 if args.quick else 10_000)
        results["metrics"]["hot_path"] = metrics_cost.hot_path_cost(5 if args.quick else 21)
    if "node" in chosen:
        results["node"] = node_client.run(
            repeat=1 if args.quick else 3, duration=1.0 if args.quick else 2.0
        )
    if "proxy" in chosen:
        results["proxy"] = proxy.run(
            repeat=1 if args.quick else 3,
            duration=1.0 if args.quick else 2.0,
            baseline=args.proxy_baseline,
        )
    if "cli" in chosen:
        results["cli"] = footprint.cli(runs=10 if args.quick else 40)
    if "memory" in chosen:
        results["memory"] = footprint.memory((1, 100, 1000) if args.quick else (1, 100, 10_000))
    if "idle" in chosen:
        results["idle"] = footprint.idle(seconds=10 if args.quick else 60)
    if "restore" in chosen:
        results["restore"] = footprint.restore(profiles=1000 if args.quick else 10_000)
    if "sealing" in chosen:
        results["sealing"] = {
            "rotation": sealing.rotation(saves=100 if args.quick else 300),
            "restart": sealing.restart(profiles=1000 if args.quick else 10_000),
        }
    if "cluster" in chosen:
        results["cluster"] = {
            "refreshes": cluster.refreshes(seconds=8.0 if args.quick else 15.0),
            "propagation": cluster.propagation(seconds=12.0 if args.quick else 30.0),
            "throughput": cluster.throughput(repeat=3 if args.quick else 5),
        }
    if "sessions" in chosen:
        results["sessions"] = {"load": sessions.load_average(), **sessions.run(args.quick)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (RESULTS / "latest.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
