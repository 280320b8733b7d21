"""The proxy's upstream client alone: httpx.AsyncClient against the proxy's pool, under trio.

N trio tasks in one process each send POST /graphql to the nginx stub and read the whole
answer, one after another, for a fixed window; the clients are measured one after the
other in each slot (same run, same load), at 1, 16 and 64 concurrent callers. What it
answers: is httpx's pool, with limits sized like the proxy's (`max_connections` and as
many keep-alive connections), fast enough to be the proxy's upstream client?

    .venv/bin/python -m benchmarks.upstream_pool [repeat] [seconds]
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from broker.proxy.reactor import Reactor
from broker.proxy.upstream import Pool, UpstreamFailed

from .proxy import FIXED_BODY, QUERY, _free_port, _nginx, _nginx_conf, ensure_nginx

CONCURRENCY = (1, 16, 64)
HEADERS = [("content-type", "application/json"), ("accept", "application/json")]
RAW_HEADERS = [(name.encode(), value.encode()) for name, value in HEADERS]
Call = Callable[[], Awaitable[None]]


def _httpx_call(client: httpx.AsyncClient, url: str) -> Call:
    async def call() -> None:
        request = client.build_request("POST", url, headers=HEADERS, content=QUERY)
        response = await client.send(request, stream=True)
        try:
            async for _ in response.aiter_raw():
                pass
        finally:
            await response.aclose()

    return call


class _Done:
    """The pool's `Caller`: an event for the trio task that waits on the answer."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def answer_head(self, status: int, headers: list[tuple[bytes, bytes]], framed: bool) -> None:
        pass

    def answer_body(self, data: bytes) -> None:
        pass

    def answer_end(self) -> None:
        self.event.set()

    def upstream_failed(self, exc: UpstreamFailed) -> None:
        self.event.set()

    def body_sent(self) -> None:
        pass


_FIELDS = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in HEADERS)


def _pool_call(pool: Pool) -> Call:
    """The pool driven from trio tasks (its own caller, the proxy, never waits)."""
    fields = _FIELDS + b"content-length: %d\r\n" % len(QUERY)

    async def call() -> None:
        done = _Done()
        pool.request(done, b"POST", b"/graphql", fields, QUERY)
        await done.event.wait()

    return call


async def _measure(call: Call, concurrency: int, seconds: float) -> float:
    done = 0
    begin = trio.current_time() + 0.3  # warm-up: connections opened, caches warm
    end = begin + seconds

    async def worker() -> None:
        nonlocal done
        while (now := trio.current_time()) < end:
            await call()
            if now >= begin:
                done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return done / seconds


async def _run(port: int, repeat: int, seconds: float) -> dict[str, dict[int, list[float]]]:
    url = f"http://127.0.0.1:{port}/graphql"
    sized = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    clients = {
        "httpx default limits": httpx.AsyncClient(trust_env=False),
        "httpx 256/256": httpx.AsyncClient(limits=sized, trust_env=False),
        "httpx 256/32 (0d26c96)": httpx.AsyncClient(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
            trust_env=False,
        ),
    }
    try:
        # The fork that carries httpcore's pool fix (`pip install httpx2` to compare).
        httpx2: Any = importlib.import_module("httpx2")
        limits2 = httpx2.Limits(max_connections=256, max_keepalive_connections=256)
        clients["httpx2 256/256"] = httpx2.AsyncClient(limits=limits2, trust_env=False)
    except ImportError:
        pass
    reactor = Reactor()
    async with trio.open_nursery() as nursery:
        await nursery.start(reactor.run)
        pool = Pool(reactor, f"http://127.0.0.1:{port}", max_connections=256, timeout=30)
        results = await _compare(clients, url, pool, repeat, seconds)
        pool.close()
        nursery.cancel_scope.cancel()
    return results


async def _compare(
    clients: dict[str, Any], url: str, pool: Pool, repeat: int, seconds: float
) -> dict[str, dict[int, list[float]]]:
    calls: dict[str, Call] = {name: _httpx_call(c, url) for name, c in clients.items()}
    calls["reactor pool"] = _pool_call(pool)
    results: dict[str, dict[int, list[float]]] = {n: {c: [] for c in CONCURRENCY} for n in calls}
    for _ in range(repeat):
        for concurrency in CONCURRENCY:
            for name, call in calls.items():
                results[name][concurrency].append(await _measure(call, concurrency, seconds))
    for client in clients.values():
        await client.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    repeat = int(args[0]) if args else 3
    seconds = float(args[1]) if len(args) > 1 else 2.0
    binary = ensure_nginx()
    workdir = Path(tempfile.mkdtemp(prefix="gb-pool-", dir="/tmp"))
    workdir.chmod(0o755)
    port = _free_port()
    conf = _nginx_conf(
        workdir,
        "stub",
        f"""    server {{
        listen 127.0.0.1:{port};
        location = /graphql {{ default_type application/json; return 200 '{FIXED_BODY}'; }}
    }}""",
    )
    try:
        with _nginx(binary, conf, port):
            started = time.monotonic()
            results = trio.run(_run, port, repeat, seconds)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"median req/s of {repeat} interleaved runs of {seconds} s ({time.monotonic() - started:.0f} s)"
    )
    print("| client | " + " | ".join(f"{c} callers" for c in CONCURRENCY) + " |")
    print("|---|" + "---:|" * len(CONCURRENCY))
    base = results["reactor pool"]
    for name, cells in results.items():
        row = []
        for c in CONCURRENCY:
            ratio = statistics.median(a / b for a, b in zip(cells[c], base[c], strict=True))
            row.append(f"{statistics.median(cells[c]):,.0f} ({ratio:.2f})")
        print(f"| {name} | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
