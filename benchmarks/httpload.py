"""Closed-loop HTTP/1.1 keep-alive load generator for loopback targets.

Each connection sends one pre-encoded request, reads one complete answer (framed by
Content-Length, which every target here sends), and sends again. Connections are
driven by one process with non-blocking sockets and epoll (level-triggered), or a
plain blocking loop for a single connection, as in loadgen.py: the per-request client
cost is identical for every target, so targets measured in the same run compare.

The loop is bounded in time (warm-up + window) and in count (`max_requests`), and only
connects to 127.0.0.1 or ::1.
"""

from __future__ import annotations

import multiprocessing
import select
import socket
import time
from array import array
from dataclasses import dataclass
from typing import Any

_RECV = 65536
_LOOPBACK = ("127.0.0.1", "::1")


def request_bytes(path: str, body: bytes, host: str = "geins") -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _Answer:
    """Incremental parse of one answer: header end, then Content-Length bytes."""

    __slots__ = ("buf", "need")

    def __init__(self) -> None:
        self.buf = b""
        self.need = -1

    def feed(self, data: bytes) -> bool:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = self.buf[:end].lower()
            if not head.startswith(b"http/1.1 200"):
                raise RuntimeError(f"answer was not 200: {head[:60]!r}")
            at = head.find(b"content-length:")
            if at < 0:
                raise RuntimeError("answer without Content-Length")
            length = int(head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None])
            self.need = end + 4 + length
        if len(self.buf) >= self.need:
            if len(self.buf) > self.need:
                raise RuntimeError("more bytes than one answer (pipelining is not used)")
            self.buf, self.need = b"", -1
            return True
        return False


@dataclass(frozen=True)
class _Job:
    address: tuple[str, int]
    request: bytes
    connections: int
    start_at: float
    begin: float
    end: float
    max_requests: int


def _worker(job: _Job, out: Any) -> None:
    family = socket.AF_INET6 if ":" in job.address[0] else socket.AF_INET
    socks = []
    for _ in range(job.connections):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(job.address)
        socks.append(sock)
    while time.monotonic() < job.start_at:
        time.sleep(0.0005)
    latencies = _single(job, socks[0]) if job.connections == 1 else _many(job, socks)
    for sock in socks:
        sock.close()
    out.send_bytes(latencies.tobytes())
    out.close()


def _single(job: _Job, sock: socket.socket) -> array[int]:
    latencies: array[int] = array("q")
    answer = _Answer()
    for _ in range(job.max_requests):
        t0 = time.perf_counter_ns()
        sock.sendall(job.request)
        while not answer.feed(sock.recv(_RECV)):
            pass
        now = time.monotonic()
        if now >= job.end:
            break
        if now >= job.begin:
            latencies.append(time.perf_counter_ns() - t0)
    return latencies


def _many(job: _Job, socks: list[socket.socket]) -> array[int]:
    latencies: array[int] = array("q")
    poller = select.epoll()
    state = {}
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
        state[sock.fileno()] = (sock, _Answer(), [time.perf_counter_ns()])
        sock.send(job.request)
    done = 0
    while done < job.max_requests:
        for fd, _ in poller.poll(1.0):
            sock, answer, started = state[fd]
            if not answer.feed(sock.recv(_RECV)):
                continue
            now = time.monotonic()
            if now >= job.end:
                return latencies
            if now >= job.begin:
                latencies.append(time.perf_counter_ns() - started[0])
            done += 1
            started[0] = time.perf_counter_ns()
            sock.send(job.request)
    return latencies


def measure(
    address: tuple[str, int],
    request: bytes,
    connections: int,
    *,
    duration: float = 2.0,
    warmup: float = 0.5,
    max_requests: int = 2_000_000,
) -> dict[str, float]:
    """req/s and latency percentiles (µs) of `connections` closed-loop connections."""
    if address[0] not in _LOOPBACK:
        raise ValueError("the load generator targets loopback only")
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    start_at = time.monotonic() + 0.5
    job = _Job(
        address,
        request,
        connections,
        start_at,
        start_at + warmup,
        start_at + warmup + duration,
        max_requests,
    )
    process = ctx.Process(target=_worker, args=(job, sender))
    process.start()
    sender.close()
    if not receiver.poll(duration + warmup + 30):
        process.kill()
        raise RuntimeError("load generator did not finish")
    raw = receiver.recv_bytes()
    process.join(10)
    latencies = array("q")
    latencies.frombytes(raw)
    ordered = sorted(latencies)
    if not ordered:
        raise RuntimeError("no request completed in the window")

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] / 1000

    return {
        "rps": len(ordered) / duration,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "requests": len(ordered),
    }
