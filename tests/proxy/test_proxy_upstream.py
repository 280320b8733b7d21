"""The proxy's upstream pool on its reactor, over real sockets: TLS verified, stale
keep-alive connections noticed, broken answers reported."""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import pytest
import trio

from broker.proxy.reactor import Reactor
from broker.proxy.upstream import Pool, UpstreamFailed, UpstreamTimedOut

Serve = Callable[[trio.abc.Stream], Awaitable[None]]


class Heard:
    """A `Caller` that keeps what it hears, for a test to await."""

    def __init__(self) -> None:
        self.status = 0
        self.body = b""
        self.failure: UpstreamFailed | None = None
        self.done = trio.Event()
        self.headed = trio.Event()

    def answer_head(self, status: int, headers: list[tuple[bytes, bytes]], framed: bool) -> None:
        self.status = status
        self.headed.set()

    def answer_body(self, data: bytes) -> None:
        self.body += data

    def answer_end(self) -> None:
        self.done.set()

    def upstream_failed(self, exc: UpstreamFailed) -> None:
        self.failure = exc
        self.headed.set()
        self.done.set()

    def body_sent(self) -> None:
        pass


async def request(pool: Pool, method: bytes = b"POST", body: bytes = b"{}") -> Heard:
    heard = Heard()
    pool.request(heard, method, b"/graphql", b"content-length: %d\r\n" % len(body), body)
    await heard.done.wait()
    return heard


@pytest.fixture
async def reactor(nursery: trio.Nursery) -> Reactor:
    loop = Reactor()
    await nursery.start(loop.run)
    return loop


async def answer_requests(
    stream: trio.abc.Stream, count: int, body: bytes = b'{"ok":1}', *, close: bool = True
) -> None:
    """Answer `count` requests on one connection, then close it (without warning) if
    `close`."""
    conn = h11.Connection(h11.SERVER)
    for _ in range(count):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.EndOfMessage):
                break
        headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
        out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
        out += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(out)
        conn.start_next_cycle()
    if close:
        await stream.aclose()


async def plain_server(nursery: trio.Nursery, serve: Serve) -> int:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


@pytest.fixture
def certificate(short_tmp: Path) -> tuple[Path, Path]:
    cert, key = short_tmp / "cert.pem", short_tmp / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def test_tls_is_verified(
    nursery: trio.Nursery, reactor: Reactor, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def serve(stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the client refused us
            await answer_requests(stream, 2)

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, serve, 0, server_context, host="127.0.0.1")
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = Pool(
        reactor, f"https://localhost:{port}", max_connections=4, timeout=10, ssl_context=trusting
    )
    for _ in range(2):  # the second over the same connection
        heard = await request(pool)
        assert (heard.status, heard.body, heard.failure) == (200, b'{"ok":1}', None)
    pool.close()
    # The system's trust store does not know this certificate: no connection.
    untrusting = Pool(reactor, f"https://localhost:{port}", max_connections=4, timeout=10)
    heard = await request(untrusting, b"GET", b"")
    assert heard.failure is not None
    assert "cannot connect" in str(heard.failure)


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    nursery: trio.Nursery, reactor: Reactor
) -> None:
    connections = 0

    async def serve(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        await answer_requests(stream, 1)

    port = await plain_server(nursery, serve)
    pool = Pool(reactor, f"http://127.0.0.1:{port}", max_connections=4, timeout=10)
    for _ in range(3):
        heard = await request(pool)
        assert heard.status == 200
        await trio.sleep(0.05)  # the server's close reaches us
    assert connections == 3
    pool.close()


@pytest.mark.parametrize("method", [b"GET", b"OPTIONS"])
async def test_a_kept_alive_connection_reset_at_its_next_request_is_retried_fresh(
    nursery: trio.Nursery, reactor: Reactor, method: bytes
) -> None:
    """The server's close can still be on its way when the pool reuses a connection:
    a reset before any answer byte sends a safe request again, once."""
    connections = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await answer_requests(stream, 1, close=False)
            await stream.receive_some(65536)  # the next request: reset, unanswered
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
        else:
            await answer_requests(stream, 1)

    port = await plain_server(nursery, serve)  # type: ignore[arg-type]
    pool = Pool(reactor, f"http://127.0.0.1:{port}", max_connections=4, timeout=10)
    for _ in range(2):
        heard = await request(pool, method, b"")
        assert (heard.status, heard.failure) == (200, None)
    assert connections == 2
    pool.close()


async def test_a_post_the_server_read_then_reset_is_not_sent_again(
    nursery: trio.Nursery, reactor: Reactor
) -> None:
    """A POST may be an order: once the origin may have read it, a reset before the
    answer is the caller's failure, never a second copy on a fresh connection."""
    connections = 0
    heard_posts = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal connections, heard_posts
        connections += 1
        if connections == 1:
            await answer_requests(stream, 1, close=False)
            heard_posts += 1
            heard_posts += (await stream.receive_some(65536)).count(b"POST ")
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
        else:
            data = await stream.receive_some(65536)
            heard_posts += data.count(b"POST ")
            await stream.aclose()

    port = await plain_server(nursery, serve)  # type: ignore[arg-type]
    pool = Pool(reactor, f"http://127.0.0.1:{port}", max_connections=4, timeout=10)
    assert (await request(pool)).status == 200
    heard = await request(pool)
    assert heard.failure is not None
    assert "reading failed" in str(heard.failure)
    await trio.sleep(0.05)  # a second copy, if one were sent, reaches the server
    assert (connections, heard_posts) == (1, 2)
    pool.close()


async def test_an_answer_cut_short_and_a_silent_server(
    nursery: trio.Nursery, reactor: Reactor
) -> None:
    async def cut_short(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await stream.aclose()

    url = f"http://127.0.0.1:{await plain_server(nursery, cut_short)}"
    pool = Pool(reactor, url, max_connections=1, timeout=5)
    heard = await request(pool, b"GET", b"")
    assert (heard.status, heard.body) == (200, b"{")
    assert isinstance(heard.failure, UpstreamFailed)
    assert not isinstance(heard.failure, UpstreamTimedOut)

    async def silent(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    url = f"http://127.0.0.1:{await plain_server(nursery, silent)}"
    quiet = Pool(reactor, url, max_connections=1, timeout=0.2)
    assert isinstance((await request(quiet, b"GET", b"")).failure, UpstreamTimedOut)
    # The slot came back: a second request is not stuck behind the first.
    assert isinstance((await request(quiet, b"GET", b"")).failure, UpstreamTimedOut)
