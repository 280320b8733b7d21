"""Contradictory framing through the Merchant API proxy, over real sockets.

A message with both Content-Length and Transfer-Encoding: chunked is one that two
parsers may read differently (request smuggling); RFC 9112 (6.1, 6.3) lets a recipient
refuse it, and the proxy's parser (llhttp) does: such a request gets a 400 and a
closed connection and never reaches Geins; such an answer is Geins' failure (502) and
never reaches the caller re-framed. The attacker is whoever writes to the proxy's
socket (a caller) or answers for Geins (an upstream that lies). Either way the caller
gets a clean answer and the daemon's log one line, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio

from broker.core.clock import SystemClock
from broker.emulator.app import Emulator
from tests.support import Broker, start_broker

GET_USER = {"query": "{ getUser { email } }"}
HEAD = b"POST /graphql HTTP/1.1\r\nHost: geins\r\nContent-Type: application/json\r\n"


async def _broker(nursery: trio.Nursery, short_tmp: Path, **settings: object) -> Broker:
    """Real time: megabytes through real sockets must not race a mock clock's jumps."""
    emulator = Emulator(clock=time.time, token_ttl=900.0)
    await emulator.start(nursery)
    broker = await start_broker(nursery, emulator, SystemClock(), short_tmp, **settings)  # type: ignore[arg-type]
    await broker.login()
    return broker


async def _exchange(broker: Broker, request: bytes) -> bytes:
    """Send `request` on a fresh connection; everything until the proxy closes it."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(broker.socket.parent / "merchant.sock"))
        stream = trio.SocketStream(sock)

        async def send() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(request)

        data = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            with trio.fail_after(20):
                with contextlib.suppress(ConnectionResetError):
                    while chunk := await sock.recv(65536):
                        data += chunk
    return data


def _chunked(body: bytes, size: int = 64 * 1024) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


def _upstream(
    emulator: Emulator, graphql_answer: bytes
) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """An upstream that answers /graphql with `graphql_answer` (raw bytes) and closes;
    anything else (the signature the login needs) it fetches from the emulator."""

    async def serve(stream: trio.abc.Stream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            if not (more := await stream.receive_some(65536)):
                return
            data += more
        target = data.split(b" ", 2)[1].decode()
        if target.startswith("/graphql"):
            # The proxy may hang up before the lie is all out (that is its answer to it).
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(graphql_answer)
        else:
            async with httpx.AsyncClient() as client:
                got = await client.get(emulator.url + target)
            head = b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\n" % got.status_code
            await stream.send_all(
                head
                + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(got.content)
                + got.content
            )
        await stream.aclose()

    return serve


async def _lied_to(nursery: trio.Nursery, short_tmp: Path, graphql_answer: bytes) -> Broker:
    emulator = Emulator(clock=time.time, token_ttl=900.0)
    await emulator.start(nursery)
    serve = _upstream(emulator, graphql_answer)
    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    settings = {"merchant_api_url": f"http://127.0.0.1:{port}"}
    broker = await start_broker(
        nursery,
        emulator,
        SystemClock(),
        short_tmp,
        profile_settings=settings,
    )
    await broker.login()
    return broker


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert [r for r in caplog.records if r.exc_info] == []


async def test_a_request_with_both_lengths_is_refused(
    nursery: trio.Nursery, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over the buffer limit the body would stream through as the caller framed it:
    its declared Content-Length (a lie here) once went with it, and the upstream
    client gave up mid-request with no answer to the caller and a traceback."""
    caplog.set_level(logging.INFO, logger="broker")
    broker = await _broker(nursery, short_tmp)
    body = json.dumps({**GET_USER, "variables": {"padding": "x" * (3 * 1024 * 1024 // 2)}})
    answer = await _exchange(
        broker,
        HEAD
        + b"Content-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
        + _chunked(body.encode()),
    )
    head, _, _ = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b"connection: close" in head.lower()
    assert [r for r in broker.emulator.service.recent if r.path == "/graphql"] == []
    assert [r.getMessage() for r in caplog.records if "request_refused" in r.getMessage()] == [
        "event=request_refused listener=proxy-unix status=400 code=bad_request"
    ]
    _no_traceback(caplog)


async def test_an_answer_with_both_lengths_is_a_502(
    nursery: trio.Nursery, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that declares a Content-Length and sends chunks: the caller gets a
    502, not a body framed by the false length."""
    caplog.set_level(logging.INFO, logger="broker")
    body = b'{"data":{"getUser":{"email":"liar@example.com"}}}'
    lie = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    lie += b"content-length: 5\r\ntransfer-encoding: chunked\r\n\r\n" + _chunked(body, 16)
    broker = await _lied_to(nursery, short_tmp, lie)
    answer = await _post(broker)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert b"upstream_unavailable" in answer
    assert b"liar" not in answer
    _no_traceback(caplog)


async def test_an_upstream_that_breaks_http_is_a_502(
    nursery: trio.Nursery, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    garbled = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nhi"
    broker = await _lied_to(nursery, short_tmp, garbled)
    answer = await _post(broker)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert b"upstream_unavailable" in answer
    _no_traceback(caplog)


async def _post(broker: Broker) -> bytes:
    request = json.dumps(GET_USER).encode()
    return await _exchange(
        broker,
        HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(request), request),
    )


async def test_an_answer_head_that_never_ends_is_a_502(
    nursery: trio.Nursery, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that sends header lines without end (and one endless value, which
    the parser holds whole until its line ends): the daemon must not hold them all and
    forward them; past the bound the caller gets a 502 and nothing of the lie."""
    caplog.set_level(logging.INFO, logger="broker")
    lines = b"".join(b"x-junk-%d: %s\r\n" % (i, b"j" * 1000) for i in range(4096))
    endless = b"x-endless: " + b"e" * (4 * 1024 * 1024) + b"\r\n"
    lie = b"HTTP/1.1 200 OK\r\n" + lines + endless + b"content-length: 2\r\n\r\nhi"
    broker = await _lied_to(nursery, short_tmp, lie)
    answer = await _post(broker)
    assert answer.startswith(b"HTTP/1.1 502 "), answer[:300]
    assert b"upstream_unavailable" in answer
    assert b"x-junk" not in answer
    _no_traceback(caplog)


async def test_a_post_the_upstream_read_then_reset_reaches_it_once(
    nursery: trio.Nursery, short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream (or a hop before it) that keeps a connection alive, reads the next
    POST on it and resets: the POST may have been acted on (an order placed), so the
    caller gets a 502 and the upstream never sees a second copy."""
    caplog.set_level(logging.INFO, logger="broker")
    emulator = Emulator(clock=time.time, token_ttl=900.0)
    await emulator.start(nursery)
    fetch = _upstream(emulator, b"")
    posts: list[bytes] = []
    answer = b'{"data":{}}'

    async def serve(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(65536)
        if not data.startswith(b"POST /graphql "):
            await fetch(_Replayed(stream, data))  # the login's signature
            return
        posts.append(data)
        if len(posts) > 1:
            return  # a second copy: the test fails on the count
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(answer)
        await stream.send_all(head + answer)
        posts.append(await stream.receive_some(65536))  # the next POST, then a reset
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    broker = await start_broker(
        nursery,
        emulator,
        SystemClock(),
        short_tmp,
        profile_settings={"merchant_api_url": f"http://127.0.0.1:{port}"},
    )
    await broker.login()
    assert (await _post(broker)).startswith(b"HTTP/1.1 200 ")
    second = await _post(broker)
    assert second.startswith(b"HTTP/1.1 502 "), second[:300]
    await trio.sleep(0.1)  # a second copy, if one were sent, arrives
    assert [p.split(b" ", 2)[:2] for p in posts] == [[b"POST", b"/graphql"]] * 2
    _no_traceback(caplog)


class _Replayed(trio.abc.Stream):
    """`stream` with `data` (already read from it) to be read first."""

    def __init__(self, stream: trio.SocketStream, data: bytes) -> None:
        self._stream, self._data = stream, data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data, self._data = self._data, b""
        return data or bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()
