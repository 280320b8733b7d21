"""The HTTP shell's socket I/O that skips trio's scheduler when it need not wait
(broker/http/io.py), and the fairness the shell keeps with it."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.lowlevel
import trio.testing

from broker.http.io import receive_some, send_all, waits
from broker.http.server import Exchange, HttpServer


def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    a, b = socket.socketpair()
    return trio.socket.from_stdlib_socket(a), trio.socket.from_stdlib_socket(b)


async def test_a_read_with_nothing_to_read_waits_until_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = _pair()
    with ours, theirs:
        before = waits()
        with pytest.raises(trio.TooSlowError):
            await receive_some(ours, trio.current_time() + 10)
        assert trio.current_time() == 10.0
        assert waits() == before + 1


async def test_bytes_already_there_are_read_without_a_wait() -> None:
    ours, theirs = _pair()
    with ours, theirs:
        await theirs.send(b"hello")
        before = waits()
        assert await receive_some(ours) == b"hello"
        await send_all(ours, b"back")
        assert waits() == before
        assert await theirs.recv(10) == b"back"


async def test_a_peer_gone_reads_as_the_end_and_fails_a_write() -> None:
    ours, theirs = _pair()
    with ours:
        theirs.close()
        assert await receive_some(ours) == b""
        with pytest.raises(trio.BrokenResourceError):
            await send_all(ours, b"x" * 100_000)


async def test_a_closed_socket_reads_as_the_end() -> None:
    ours, theirs = _pair()
    with theirs:
        ours.close()
        assert await receive_some(ours) == b""


async def test_pipelined_requests_answered_at_once_let_other_tasks_run() -> None:
    """A client that pipelines requests its answers need no wait for must not hold
    trio's only thread: the shell checkpoints after each such request."""
    ticks = 0
    seen: list[int] = []

    async def handler(exchange: Exchange) -> None:
        seen.append(ticks)
        await exchange.respond(200, [("content-type", "text/plain")], b"ok")

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    server = HttpServer(handler)
    requests = 50
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            nursery.start_soon(ticker)
            client = await trio.open_tcp_stream(*listener.getsockname()[:2])
            async with client:
                await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
                answers = b""
                while answers.count(b"HTTP/1.1 200") < requests:
                    answers += await client.receive_some(65536)
            nursery.cancel_scope.cancel()
    assert len(seen) == requests
    # Every request was read in one go, yet the ticker ran between them.
    assert len(set(seen)) > requests // 2
