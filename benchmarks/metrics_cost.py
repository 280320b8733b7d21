"""What metrics cost the token path: throughput at 64 connections, side by side.

Three daemons, each with one logged-in profile, measured in turn within every
repetition (so the machine's drift hits all alike), by the same load generator as
tokens.py:

- **before**: the tree at a revision without metrics (`--baseline REV`, exported with
  `git archive` into a temporary directory): no counting at all;
- **off**: this tree, never scraped: the per-request count is all it pays;
- **on**: this tree, scraped through the `metrics` op every second (a Prometheus with a
  1 s scrape interval, fifteen times the usual rate) and writing the textfile every
  second.

The goal is `on` within 3 % of `off`-without-metrics, i.e. of `before`.
Ratios are medians of the per-repetition ratios. On a shared machine throughput swings
by tens of per cent from one second to the next; the daemon's CPU time per answered
request (from /proc, over the same window) moves much less, so it is reported too and
is the better measure of what metrics cost.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support import call

from .fleet import fleet
from .loadgen import broker_token_request, run_load

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def exported(revision: str) -> Iterator[Path]:
    """The project's tree at `revision`, in a temporary directory."""
    directory = Path(tempfile.mkdtemp(prefix="gbb-rev-", dir="/tmp"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def scraping(socket: Path, every: float) -> Iterator[list[int]]:
    """Scrape over the socket every `every` seconds until the block ends."""
    stop = threading.Event()
    sizes: list[int] = []

    def scrape() -> None:
        while not stop.wait(every):
            answer = call(socket, op="metrics")
            assert answer.get("ok"), answer
            sizes.append(len(answer["text"]))

    thread = threading.Thread(target=scrape, daemon=True)
    thread.start()
    try:
        yield sizes
    finally:
        stop.set()
        thread.join()


def run(
    repeat: int = 7,
    duration: float = 2.0,
    *,
    warmup: float = 0.5,
    connections: int = 64,
    baseline: str | None = None,
    every: float = 1.0,
) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {}
    scrapes = 0
    with contextlib.ExitStack() as stack:
        daemons = {}
        if baseline is not None:
            source = stack.enter_context(exported(baseline))
            daemons[f"before ({baseline})"] = stack.enter_context(fleet(1, source=source))
        daemons["off"] = stack.enter_context(fleet(1))
        textfile = stack.enter_context(tempfile.TemporaryDirectory(prefix="gbb-tf-", dir="/tmp"))
        daemons["on"] = stack.enter_context(
            fleet(1, metrics={"textfile": f"{textfile}/g.prom", "textfile_interval": every})
        )
        for _ in range(repeat):
            for name, daemon in daemons.items():
                with contextlib.ExitStack() as during:
                    if name == "on":
                        sizes = during.enter_context(scraping(daemon.socket, every))
                    result = run_load(
                        str(daemon.socket),
                        broker_token_request(),
                        connections,
                        duration=duration,
                        warmup=warmup,
                        workers=1,
                        server_pid=daemon.pid,
                    )
                if name == "on":
                    scrapes += len(sizes)
                if result["errors"]:
                    raise RuntimeError(f"{name}: {result['error_samples']}")
                results.setdefault(name, []).append(result)
    names = list(results)
    summary: dict[str, Any] = {
        name: {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50_us": statistics.median(r["p50_us"] for r in runs),
            "p99_us": statistics.median(r["p99_us"] for r in runs),
            "cpu_us": statistics.median(_cpu_us(r) for r in runs),
        }
        for name, runs in results.items()
    }
    ratios = {}
    for reference in names:
        if reference == "on":
            continue
        paired = [
            on["rps"] / ref["rps"]
            for on, ref in zip(results["on"], results[reference], strict=True)
        ]
        cpu = [
            _cpu_us(ref) / _cpu_us(on)
            for on, ref in zip(results["on"], results[reference], strict=True)
        ]
        ratios[f"on / {reference}"] = {
            "median": statistics.median(paired),
            "range": [min(paired), max(paired)],
            "cpu_median": statistics.median(cpu),
            "cpu_range": [min(cpu), max(cpu)],
        }
    return {
        "repeat": repeat,
        "duration": duration,
        "connections": connections,
        "scrape_every": every,
        "scrapes": scrapes,
        "daemons": summary,
        "ratios": ratios,
    }


def _cpu_us(result: dict[str, Any]) -> float:
    """The daemon's CPU time per answered request, in microseconds."""
    return float(result["server_cpu"]) / float(result["rps"]) * 1e6


def table(result: dict[str, Any]) -> str:
    lines = [
        "| daemon | req/s | p50 / p99 µs | daemon CPU µs per request |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["daemons"].items():
        lines.append(
            f"| {name} | {row['rps']:,.0f} | {row['p50_us']:.0f} / {row['p99_us']:.0f} "
            f"| {row['cpu_us']:.2f} |"
        )
    lines += [
        "",
        "| ratio | req/s: median (range) | per-request CPU, inverted: median (range) |",
        "|---|---:|---:|",
    ]
    for name, r in result["ratios"].items():
        lines.append(
            f"| {name} | {r['median']:.3f} ({r['range'][0]:.3f} - {r['range'][1]:.3f}) "
            f"| {r['cpu_median']:.3f} ({r['cpu_range'][0]:.3f} - {r['cpu_range'][1]:.3f}) |"
        )
    return "\n".join(lines)


def scrape_cost(profiles: int = 10_000, runs: int = 5) -> dict[str, Any]:
    """What one scrape of a daemon with `profiles` active profiles costs: the copy made
    on the event loop (the only part the token path can feel) and the formatting done
    in a worker thread, per_profile on and off. Profiles are stand-ins with real
    sessions and counts; the collector cannot tell."""
    import time

    from broker.core.secret import Secret
    from broker.core.stats import Counts, DaemonStats
    from broker.observe.metrics import Metrics, render
    from broker.policy.session import Session, Tokens

    class Stand:
        def __init__(self, name: str, now: float) -> None:
            self.name = name
            self.session = Session(name)
            no_claims: Any = None  # the collector never reads them
            tokens = Tokens(Secret("b"), Secret("r"), no_claims, now, now + 900, now + 86400)
            self.session.logged_in(tokens, "ada", False, now)
            self.tokens_from_memory = 1234
            self.token_results = Counts("result")
            self.token_results.inc("waited")
            self.refresh_results = Counts("result")
            self.refresh_results.inc("ok")

    class Daemon:
        def __init__(self, per_profile: bool) -> None:
            now = time.time()
            self.stats = DaemonStats()
            self.started_at = now
            self.per_profile = per_profile
            self._profiles = [Stand(f"p{i:05d}", now) for i in range(profiles)]

        def live_profiles(self) -> list[Stand]:
            return self._profiles

        def retired_profiles(self) -> list[Stand]:
            return []

        def connection_count(self) -> int:
            return 64

        def waiting_ops(self) -> dict[str, int]:
            return {}

        def refreshes_in_flight(self) -> int:
            return 0

    out: dict[str, Any] = {"profiles": profiles}
    for per_profile in (True, False):
        metrics = Metrics(Daemon(per_profile))
        copies, formats, size = [], [], 0
        for _ in range(runs):
            start = time.perf_counter()
            snapshot = metrics.snapshot()
            copied = time.perf_counter()
            size = len(render(snapshot))
            copies.append(copied - start)
            formats.append(time.perf_counter() - copied)
        out["per_profile" if per_profile else "summed"] = {
            "snapshot_ms": statistics.median(copies) * 1000,
            "render_ms": statistics.median(formats) * 1000,
            "bytes": size,
        }
    return out


def hot_path_cost(rounds: int = 21, calls: int = 200_000) -> dict[str, Any]:
    """The count on the token path, in isolation: `Profile.token_frame` as it is
    against the same method without its `+= 1` (as it was before metrics), alternated
    round by round in one process. Throughput across processes on a shared machine
    cannot resolve a difference this small; this can."""
    import time

    from broker.core.clock import SystemClock
    from broker.core.secret import Secret
    from broker.daemon.config_profiles import ProfileConfig
    from broker.geins.protocol import Endpoint
    from broker.policy.session import Tokens
    from broker.sessions.frame import TokenFrame
    from broker.sessions.profile import Profile

    class Uncounted(TokenFrame):
        def answer(self, request_id: int, min_valid: float, now: float) -> bytes | None:
            if self._revision != self._session.revision:
                self._prepare()
            left = self._serve_until - now
            if left <= 0 or left < min_valid or self._prepared is None:
                return None
            return self._prepared.frame(request_id)

    now = time.time()
    unused: Any = None  # neither the HTTP client, the store nor the limiter is touched
    no_claims: Any = None
    profiles = {}
    for name, counted in (("counted", True), ("uncounted", False)):
        profile = Profile(
            ProfileConfig("default", Endpoint("demo", "key")),
            http=unused,
            store=unused,
            wall=SystemClock(),
            limiter=unused,
        )
        bearer = Secret("eyJ" + "x" * 650)  # about the size of a Geins bearer
        tokens = Tokens(bearer, Secret("r"), no_claims, now, now + 900, None)
        profile.session.logged_in(tokens, "ada", False, now)
        if not counted:
            profile.token_frame = Uncounted(profile.name, profile.session).answer
        profiles[name] = profile
    per_call: dict[str, list[float]] = {name: [] for name in profiles}
    for _ in range(rounds):
        for name, profile in profiles.items():
            frame = profile.token_frame
            start = time.perf_counter()
            for request_id in range(calls):
                frame(request_id, 0, now)
            per_call[name].append((time.perf_counter() - start) / calls * 1e9)
    counted_ns = statistics.median(per_call["counted"])
    uncounted = statistics.median(per_call["uncounted"])
    return {
        "rounds": rounds,
        "calls": calls,
        "counted_ns": counted_ns,
        "uncounted_ns": uncounted,
        "delta_ns": counted_ns - uncounted,
        "min_delta_ns": min(per_call["counted"]) - min(per_call["uncounted"]),
    }
