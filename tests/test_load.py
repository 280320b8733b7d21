"""512 clients asking for tokens for a minute while the bearer rotates every 10 s.

Every answer is decoded and checked when it arrives: ok, and a token that has not
expired, neither by the daemon's `expires_at` nor by the JWT's own `exp`. The figures
(requests, p50/p99 latency, distinct tokens seen) are printed for the record.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import resource
import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    DaemonProcess,
    EmulatorProcess,
    call,
    write_config,
)

CONNECTIONS = 512
WORKERS = 2
SECONDS = 60.0


def _exp(token: str) -> int:
    part = token.split(".")[1]
    return int(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))["exp"])


def _worker(path: str, connections: int, seconds: float, results: Any) -> None:
    """One load process: `connections` sockets, one request in flight on each."""
    request = encode({"id": 1, "op": "token"})
    epoll = select.epoll()
    socks: dict[int, tuple[socket.socket, FrameDecoder]] = {}
    for _ in range(connections):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.setblocking(False)
        socks[sock.fileno()] = (sock, FrameDecoder(MAX_RESPONSE_SIZE))
        epoll.register(sock.fileno(), select.EPOLLIN)
    sent_at: dict[int, float] = {}
    latencies: list[float] = []
    exp_of: dict[str, int] = {}
    errors: list[str] = []
    expired = 0
    end = time.monotonic() + seconds
    for fd, (sock, _) in socks.items():
        sent_at[fd] = time.perf_counter()
        sock.send(request)
    while time.monotonic() < end:
        for fd, _ in epoll.poll(0.1):
            sock, decoder = socks[fd]
            data = sock.recv(65536)
            if not data:
                errors.append("closed")
                epoll.unregister(fd)
                continue
            for answer in decoder.feed(data):
                now, wall = time.perf_counter(), time.time()
                latencies.append(now - sent_at[fd])
                if not answer.get("ok"):
                    errors.append(str(answer.get("error")))
                    continue
                token = answer["token"]
                exp = exp_of.get(token)
                if exp is None:
                    exp = exp_of[token] = _exp(token)
                if answer["expires_at"] <= wall or exp <= wall:
                    expired += 1
                sent_at[fd] = time.perf_counter()
                sock.send(request)
    for sock, _ in socks.values():
        sock.close()
    latencies.sort()
    results.put(
        {
            "requests": len(latencies),
            "errors": errors[:5],
            "error_count": len(errors),
            "expired": expired,
            "tokens": len(exp_of),
            "latencies": latencies[:: max(1, len(latencies) // 20000)],
        }
    )


@pytest.mark.slow
def test_512_clients_for_a_minute_across_rotations(short_tmp: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    emulator = EmulatorProcess("--token-ttl", "13.34")  # 75 % of it: a rotation every 10 s
    sock = short_tmp / "b.sock"
    config = write_config(
        short_tmp / "c.toml", emulator.url, sock, short_tmp / "state", profile={"jitter": 0}
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        assert call(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD, remember=True)[
            "ok"
        ]
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        workers = [
            context.Process(
                target=_worker, args=(str(sock), CONNECTIONS // WORKERS, SECONDS, results)
            )
            for _ in range(WORKERS)
        ]
        for worker in workers:
            worker.start()
        outcome = [results.get(timeout=SECONDS + 60) for _ in workers]
        for worker in workers:
            worker.join(timeout=10)
        refreshes = call(sock, op="status")["profiles"][0]["refreshes"]
    finally:
        assert daemon.stop() == 0
        emulator.stop()
    requests = sum(o["requests"] for o in outcome)
    latencies = sorted(x for o in outcome for x in o["latencies"])
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    print(
        f"load: {requests:,} token requests over {SECONDS:g} s from {CONNECTIONS} connections "
        f"({requests / SECONDS:,.0f}/s), p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
        f"{refreshes} rotations, {max(o['tokens'] for o in outcome)} distinct tokens seen"
    )
    assert sum(o["error_count"] for o in outcome) == 0, [o["errors"] for o in outcome]
    assert sum(o["expired"] for o in outcome) == 0
    assert refreshes >= 5
    assert min(o["tokens"] for o in outcome) >= 5  # every worker saw the rotations
