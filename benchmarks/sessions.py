"""Customer sessions at scale: the four figures of docs/sessions.md's goals, in one run.

- **tokens**: `session_token` answered from memory against a profile's `token`, same
  daemon, same load generator, interleaved (session_tokens.py); goal within 1.2x at 64
  connections (the daemon's CPU per answer is the figure to read on a shared machine).
- **fanout**: sessions whose bearer has expired while nobody used them, then N
  concurrent `session_token` requests on each over the wire (the SSR page that fans
  out): exactly one refresh upstream per session, no failure.
- **memory**: the whole daemon's resident memory with 100,000 live sessions (seeded
  into its store, then each touched over the wire, which loads it into memory with its
  key and prepared state) against the same daemon before any is touched; the restart
  to serving; the refreshes at start (none: sessions nobody uses cost Geins nothing).
- **soak**: 10,000 sessions in use with 60-s bearers against the emulator for five
  minutes (`--quick`: one): failures, rotations, group commits (fsyncs) per rotation,
  and the daemon's CPU per refresh.

Sessions are seeded as the daemon itself would write them (sealed twice: keyring and
handle key, through `CustomerStore`'s group commits), with tokens the emulator minted,
so a refresh is a real rotation at the emulator. Everything runs against real
processes over real sockets.

    .venv/bin/python -m benchmarks.sessions [tokens fanout memory soak] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from broker.core.sealing import Keyring
from broker.core.secret import Secret
from broker.customers.model import record as records
from broker.customers.model.handles import new_handle, session_key
from broker.customers.model.record import SessionRecord
from broker.customers.store import CustomerStore, Row
from broker.geins import claims
from broker.storage.keys import read_key_file
from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from tests.support import DEMO_USER, GEINS_BROKER, DaemonProcess, EmulatorProcess, write_config

from . import session_tokens

APP = "shop"
PARTS = ("tokens", "fanout", "memory", "soak")
#: Broker limits for the benchmarks' own connections (the defaults are for strangers).
LIMITS = {"max_requests_per_connection": 1024, "max_connections_per_uid": 256}
#: Emulator sessions minted per control request (each is ~1 KB of JSON).
MINT_BATCH = 5000


# -- the daemon's surroundings -------------------------------------------------------------


@dataclass
class Rig:
    work: Path
    emulator: EmulatorProcess
    config: Path
    socket: Path
    state: Path
    keyring: Keyring


@contextmanager
def rig(*emulator_args: str, app: dict[str, Any] | None = None) -> Iterator[Rig]:
    """An emulator, a sealing key and a config with one app; no daemon yet."""
    with tempfile.TemporaryDirectory(prefix="gb-", dir="/tmp") as tmp:
        work = Path(tmp)
        key = work / "k.key"
        subprocess.run(
            [*GEINS_BROKER, "key", "generate", "-o", str(key)], check=True, capture_output=True
        )
        emulator = EmulatorProcess(*emulator_args)
        try:
            state = work / "state"
            state.mkdir(mode=0o700)
            sock = work / "b.sock"
            config = write_config(
                work / "c.toml",
                emulator.url,
                sock,
                state,
                broker={**LIMITS, "key_file": str(key)},
                apps={APP: app or {}},
            )
            yield Rig(work, emulator, config, sock, state, Keyring(read_key_file(key), ()))
        finally:
            emulator.stop()


def mint(emulator: EmulatorProcess, count: int) -> list[tuple[str, str]]:
    """`count` (bearer, refresh token) pairs the emulator issued to the demo user."""
    minted: list[tuple[str, str]] = []
    while len(minted) < count:
        batch = min(MINT_BATCH, count - len(minted))
        answer = emulator.control("POST", "sessions", {"username": DEMO_USER, "count": batch})
        minted += [(s["token"], s["refresh_token"]) for s in answer["sessions"]]
    return minted


def seed(
    r: Rig,
    tokens: Sequence[tuple[str, str]],
    *,
    expired: bool = False,
    distinct_users: bool = False,
    spread: float = 0.0,
) -> list[str]:
    """Store one session per token pair as a login would have (the daemon not running);
    their handles. `expired`: the bearer ran out a minute ago (the record says so).
    `distinct_users`: customer N is customerN@example.com (else all are the demo user).
    `spread`: each bearer was obtained up to that many seconds ago (the record says it
    expires as much earlier), so sessions minted at once rotate spread out, as sessions
    logged in over time would."""
    now = time.time()
    rng = random.Random(0)
    handles: list[str] = []
    rows: list[Row] = []
    store = CustomerStore.in_state_dir(r.state, r.keyring)
    try:
        for index, (bearer, refresh) in enumerate(tokens):
            username = f"customer{index}@example.com" if distinct_users else DEMO_USER
            handle = new_handle()
            session_id = store.store_key.session_id(APP, handle)
            offset = rng.uniform(0.0, spread)
            expires_at = now - 60 if expired else float(claims.decode(bearer).exp) - offset
            record = SessionRecord(
                app=APP,
                username=username,
                remember=True,
                bearer=Secret(bearer),
                refresh=Secret(refresh),
                obtained_at=now - 120 if expired else now - offset,
                expires_at=expires_at,
                session_ends_at=now + 7 * 86400,
                created_at=now,
                generation=1,
                committed_at=now,
            )
            sealed = records.seal(record, r.keyring, session_id, session_key(APP, handle))
            rows.append(
                Row(
                    session_id=session_id,
                    app=APP,
                    customer_id=store.store_key.customer_id(APP, username),
                    name=records.seal_name(r.keyring, APP, session_id, username),
                    remember=True,
                    created_at=now,
                    last_used_at=now,
                    ends_at=record.session_ends_at,
                    record=sealed,
                )
            )
            handles.append(handle.reveal())
        trio.run(_commit_all, store, rows)
    finally:
        store.close()
    return handles


async def _commit_all(store: CustomerStore, rows: list[Row]) -> None:
    """Through the store's own writer: group commits of up to its MAX_GROUP rows."""
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for start in range(0, len(rows), 4096):
            async with trio.open_nursery() as batch:
                for row in rows[start : start + 4096]:
                    batch.start_soon(store.commit, row)
        nursery.cancel_scope.cancel()


# -- talking to the daemon ---------------------------------------------------------------------


def token_frame(request_id: int, handle: str, min_valid: float = 0.0) -> bytes:
    message: dict[str, Any] = {"id": request_id, "op": "session_token", "app": APP}
    message["handle"] = handle
    if min_valid:
        message["min_valid"] = min_valid
    return encode(message)


def ask_all(
    path: Path, frames: Sequence[bytes], window: int | None = None, timeout: float = 120.0
) -> list[dict[str, Any]]:
    """Every frame on one connection, pipelined: all at once, or at most `window` in
    flight (a new one sent as each answer comes); every answer, in order of arrival."""
    answers: list[dict[str, Any]] = []
    ahead = len(frames) if window is None else window
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sender = threading.Thread(target=sock.sendall, args=(b"".join(frames[:ahead]),))
        sender.start()
        sent = min(ahead, len(frames))
        decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        while len(answers) < len(frames):
            data = sock.recv(1 << 20)
            if not data:
                raise RuntimeError("the daemon closed the connection")
            got = decoder.feed(data)
            answers += got
            if sent < len(frames) and got:
                sender.join()
                sock.sendall(b"".join(frames[sent : sent + len(got)]))
                sent += len(got)
        sender.join()
    return answers


def in_parallel(
    path: Path, batches: Sequence[Sequence[bytes]], window: int | None = None
) -> list[dict[str, Any]]:
    """`ask_all` on one connection per batch, all at once; the answers of all."""
    results: list[list[dict[str, Any]]] = [[] for _ in batches]
    errors: list[BaseException] = []

    def one(index: int) -> None:
        try:
            results[index] = ask_all(path, batches[index], window)
        except BaseException as exc:  # reported below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [answer for result in results for answer in result]


def metric(path: Path, name: str) -> float:
    """One sample of the daemon's metrics (the `metrics` op), summed over its labels."""
    answer = call(path, op="metrics")
    total = 0.0
    for line in answer["text"].splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def call(path: Path, **message: Any) -> dict[str, Any]:
    (answer,) = ask_all(path, [encode({"id": 1, **message})], timeout=30.0)
    return answer


def refreshes(emulator: EmulatorProcess) -> int:
    return int(emulator.control("GET", "stats")["counts"].get("GET /login", 0))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# -- fan-out -------------------------------------------------------------------------------------


def fanout(sessions: int = 1000, per_session: int = 50) -> dict[str, Any]:
    """One session, then `sessions` at once, each with `per_session` concurrent requests
    (one connection per concurrent request, as SSR workers would hold), bearers expired."""
    out: dict[str, Any] = {"per_session": per_session, "load": load_average()}
    with rig() as r:
        tokens = mint(r.emulator, 1 + sessions)
        handles = seed(r, tokens, expired=True)
        daemon = DaemonProcess(r.config, r.work)
        try:
            for label, chosen in (("one", handles[:1]), ("many", handles[1:])):
                r.emulator.control("DELETE", "stats")
                started = time.monotonic()
                batches = [
                    [token_frame(i, handle) for i, handle in enumerate(chosen)]
                    for _ in range(per_session)
                ]
                answers = in_parallel(r.socket, batches)
                seconds = time.monotonic() - started
                failures = [a for a in answers if not a.get("ok")]
                by_session: dict[int, set[str]] = {}
                for answer in answers:
                    if answer.get("ok"):
                        by_session.setdefault(answer["id"], set()).add(answer["token"])
                out[label] = {
                    "sessions": len(chosen),
                    "requests": len(answers),
                    "failures": len(failures),
                    "failure_samples": [f.get("error") for f in failures[:3]],
                    "refreshes": refreshes(r.emulator),
                    # One refresh per session means every answer for it is one bearer.
                    "bearers_per_session": max((len(b) for b in by_session.values()), default=0),
                    "seconds": seconds,
                }
        finally:
            daemon.close()
    return out


# -- memory, restart -----------------------------------------------------------------------------


def memory(sessions: int = 100_000, connections: int = 16) -> dict[str, Any]:
    """The whole daemon's RSS empty, then with `sessions` seeded and touched; the restart."""
    out: dict[str, Any] = {"sessions": sessions, "load": load_average()}
    with rig() as r:
        tokens = mint(r.emulator, min(sessions, MINT_BATCH))
        # Distinct customers with the emulator's tokens (reused: the bearer's size is
        # what counts here, and nothing is refreshed).
        pairs = [tokens[i % len(tokens)] for i in range(sessions)]
        daemon = DaemonProcess(r.config, r.work)
        try:
            call(r.socket, op="status")
            time.sleep(1.0)
            out["empty_rss_kib"] = rss_kib(daemon.process.pid)
        finally:
            daemon.stop()
        started = time.monotonic()
        handles = seed(r, pairs, distinct_users=True)
        out["seed_seconds"] = time.monotonic() - started
        r.emulator.control("DELETE", "stats")
        started = time.monotonic()
        daemon = DaemonProcess(r.config, r.work, wait_ready=False)
        try:
            daemon.wait_ready(30.0)
            out["ready_s"] = time.monotonic() - started
            first = call(r.socket, op="session_token", app=APP, handle=handles[0])
            out["serving_s"] = time.monotonic() - started
            if not first.get("ok"):
                raise RuntimeError(f"first session_token: {first}")
            time.sleep(2.0)
            out["refreshes_at_start"] = refreshes(r.emulator)
            out["untouched_rss_kib"] = rss_kib(daemon.process.pid)
            started = time.monotonic()
            per = (len(handles) + connections - 1) // connections
            batches = [
                [token_frame(i, h) for i, h in enumerate(handles[c * per : (c + 1) * per])]
                for c in range(connections)
            ]
            # A few requests in flight per connection, as a storefront's workers would
            # send them (all 100,000 at once would measure trio's high-water mark).
            answers = in_parallel(r.socket, batches, window=4)
            out["touch_seconds"] = time.monotonic() - started
            out["touch_failures"] = sum(1 for a in answers if not a.get("ok"))
            # And once more: now every answer comes from memory (and nothing grows).
            in_parallel(r.socket, batches, window=4)
            time.sleep(1.0)
            out["rss_kib"] = rss_kib(daemon.process.pid)
            out["refreshes_after"] = refreshes(r.emulator)
            out["in_memory"] = metric(
                r.socket, f'geins_broker_customer_sessions{{app="{APP}",where="memory"}}'
            )
        finally:
            daemon.close()
    grown = out["rss_kib"] - out["empty_rss_kib"]
    out["per_session_bytes"] = grown * 1024 / sessions
    out["per_session_over_untouched_bytes"] = (
        (out["rss_kib"] - out["untouched_rss_kib"]) * 1024 / sessions
    )
    return out


# -- the soak ------------------------------------------------------------------------------------


def soak(
    sessions: int = 10_000, seconds: float = 300.0, warmup: float = 60.0, use_every: float = 20.0
) -> dict[str, Any]:
    """`sessions` in use (each asked for its token every `use_every` s, spread evenly),
    60-s bearers: `warmup` s (every session loaded, the first rotations), then the
    measured `seconds`. Failures are counted over both."""
    out: dict[str, Any] = {
        "sessions": sessions,
        "seconds": seconds,
        "warmup": warmup,
        "load_before": load_average(),
    }
    with rig("--token-ttl", "60") as r:
        # Bearers obtained over the last 25 s: their rotations (at 0.75 of 60 s) come
        # spread over 20-45 s from now, after each session's first use (within 20 s),
        # as a steady stream of logins would leave them.
        handles = seed(r, mint(r.emulator, sessions), spread=25.0)
        daemon = DaemonProcess(r.config, r.work)
        pid = daemon.process.pid
        try:
            r.emulator.control("DELETE", "stats")
            users = Users(r.socket, handles, time.monotonic() + warmup + seconds, use_every)
            workers = threading.Thread(target=users.run)
            workers.start()
            time.sleep(warmup)
            commits0 = metric(r.socket, "geins_broker_customer_store_commit_seconds_count")
            writing0 = metric(r.socket, "geins_broker_customer_store_commit_seconds_sum")
            rotations0, cpu0, started = refreshes(r.emulator), cpu_seconds(pid), time.monotonic()
            workers.join()
            out["cpu_seconds"] = cpu_seconds(pid) - cpu0
            out["wall_seconds"] = time.monotonic() - started
            out["load_after"] = load_average()
            out["warmup_rotations"] = rotations0
            out["rotations"] = refreshes(r.emulator) - rotations0
            out["commits"] = (
                metric(r.socket, "geins_broker_customer_store_commit_seconds_count") - commits0
            )
            # The writer's time in groups (write and fsync): near the wall time, it
            # was never idle, and a group's size is the rotations arriving during one.
            out["writing_seconds"] = (
                metric(r.socket, "geins_broker_customer_store_commit_seconds_sum") - writing0
            )
            out["refresh_failures"] = metric(
                r.socket, 'geins_broker_customer_refreshes_total{app="shop",result="error"}'
            )
            out.update(users.counts, failure_samples=users.samples)
        finally:
            daemon.close()
    out["rotations_per_commit"] = out["rotations"] / max(out["commits"], 1)
    out["ms_per_commit"] = out["writing_seconds"] / max(out["commits"], 1) * 1000
    out["writer_busy"] = out["writing_seconds"] / max(out["wall_seconds"], 1e-9)
    out["cpu_ms_per_refresh"] = out["cpu_seconds"] / max(out["rotations"], 1) * 1000
    return out


class Users:
    """Storefront workers: each asks for the tokens of its share of the sessions, one
    request at a time, paced so each session is used every `use_every` s."""

    WORKERS = 8

    def __init__(self, path: Path, handles: list[str], stop: float, use_every: float) -> None:
        self.path, self.handles, self.stop, self.use_every = path, handles, stop, use_every
        self.counts = {"requests": 0, "failures": 0, "stale": 0, "timeouts": 0}
        self.samples: list[Any] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self._worker, args=(i,)) for i in range(self.WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _worker(self, index: int) -> None:
        mine = self.handles[index :: self.WORKERS]
        gap = self.use_every / len(mine)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(60.0)
            sock.connect(str(self.path))
            decoder = FrameDecoder(MAX_RESPONSE_SIZE)
            next_at, i = time.monotonic(), 0
            while time.monotonic() < self.stop:
                sock.sendall(token_frame(i, mine[i % len(mine)]))
                answers: list[dict[str, Any]] = []
                while not answers:
                    try:
                        data = sock.recv(65536)
                    except TimeoutError:  # no answer in 60 s: a failure; this worker stops
                        with self._lock:
                            self.counts["timeouts"] += 1
                        return
                    if not data:
                        raise RuntimeError("the daemon closed the connection")
                    answers = decoder.feed(data)
                self._count(answers[0])
                i += 1
                next_at += gap
                if (pause := next_at - time.monotonic()) > 0:
                    time.sleep(pause)

    def _count(self, answer: dict[str, Any]) -> None:
        with self._lock:
            self.counts["requests"] += 1
            if not answer.get("ok"):
                self.counts["failures"] += 1
                if len(self.samples) < 3:
                    self.samples.append(answer.get("error"))
            elif answer["expires_at"] <= time.time():
                self.counts["stale"] += 1


# -- all of it -----------------------------------------------------------------------------------


def run(quick: bool = False, only: Sequence[str] = ()) -> dict[str, Any]:
    chosen = set(only) or set(PARTS)
    results: dict[str, Any] = {}
    if "tokens" in chosen:
        rows = session_tokens.run(repeat=3 if quick else 7, duration=1.0 if quick else 2.0)
        results["tokens"] = {"rows": rows, "load": load_average()}
    if "fanout" in chosen:
        results["fanout"] = fanout(sessions=100 if quick else 1000)
    if "memory" in chosen:
        results["memory"] = memory(sessions=10_000 if quick else 100_000)
    if "soak" in chosen:
        results["soak"] = soak(seconds=60.0 if quick else 300.0, warmup=20.0 if quick else 60.0)
    return results


def table(results: dict[str, Any]) -> str:
    """The figures beside their goals (markdown)."""
    lines = ["| figure | measured | goal |", "|---|---|---|"]
    if "tokens" in results:
        for row in results["tokens"]["rows"]:
            ratios = row["cpu_ratios"]
            lines.append(
                f"| `session_token` / `token`, {row['connections']} connections | "
                f"CPU per answer {row['session_token_cpu_us']:.2f} / {row['token_cpu_us']:.2f} µs: "
                f"**{statistics.median(ratios):.2f}x** (per slot {ratios[0]:.2f}-{ratios[-1]:.2f}); p50 {row['session_token_p50_us']:.0f} / "
                f"{row['token_p50_us']:.0f} µs; req/s ratio {row['ratio']:.2f} | "
                f"{'within 1.2x' if row['connections'] == 64 else '-'} |"
            )
    if "fanout" in results:
        f = results["fanout"]
        for label in ("one", "many"):
            c = f[label]
            lines.append(
                f"| fan-out: {c['sessions']:,} session(s) x {f['per_session']} concurrent requests, "
                f"bearer expired | **{c['refreshes']:,} refreshes**, {c['failures']} failures "
                f"of {c['requests']:,}, {c['bearers_per_session']} bearer per session, "
                f"{c['seconds']:.2f} s | {c['sessions']:,} refreshes, 0 failures |"
            )
    if "memory" in results:
        m = results["memory"]
        lines += [
            f"| RSS, {m['sessions']:,} live sessions | {m['rss_kib'] / 1024:.1f} MiB, empty daemon "
            f"{m['empty_rss_kib'] / 1024:.1f} MiB: **{m['per_session_bytes']:,.0f} bytes per "
            f"session** | at most 2,048 |",
            f"| restart on {m['sessions']:,} stored sessions | READY=1 after {m['ready_s']:.2f} s, "
            f"first answer after **{m['serving_s']:.2f} s** | within 1 s |",
            f"| refreshes at start | **{m['refreshes_at_start']}** (after touching every "
            f"session: {m['refreshes_after']}) | 0 |",
        ]
    if "soak" in results:
        s = results["soak"]
        lines.append(
            f"| {s['sessions']:,} sessions in use, 60-s bearers, {s['seconds']:g} s "
            f"(after {s['warmup']:g} s of warm-up) | "
            f"**{s['failures'] + s['timeouts']} failures** of {s['requests']:,} requests, "
            "warm-up included "
            f"({s['timeouts']} unanswered in 60 s, {s['stale']} expired); "
            f"{s['rotations']:,} rotations in {s['commits']:,.0f} commits: "
            f"**{s['rotations_per_commit']:.1f} rotations per fsync** ({s['ms_per_commit']:.1f} ms "
            f"per group, the writer busy {s['writer_busy']:.0%} of the time); daemon CPU "
            f"**{s['cpu_ms_per_refresh']:.2f} ms per refresh** (all its work included) | "
            "0 failures, at least 20 rotations per fsync |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sessions")
    parser.add_argument("only", nargs="*", metavar="NAME", help=f"some of {', '.join(PARTS)}")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(PARTS):
        parser.error(f"unknown part {sorted(unknown)[0]!r}; choose from {', '.join(PARTS)}")
    results = run(args.quick, args.only)
    print(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
