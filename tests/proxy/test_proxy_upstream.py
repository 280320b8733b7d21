"""The proxy's upstream pool over real sockets: TLS verified, stale keep-alive
connections noticed, broken answers reported."""

from __future__ import annotations

import contextlib
import functools
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import h11
import pytest
import trio

from broker.proxy.upstream import Pool, UpstreamFailed, UpstreamTimedOut

Serve = Callable[[trio.abc.Stream], Awaitable[None]]


async def answer_requests(stream: trio.abc.Stream, count: int, body: bytes = b'{"ok":1}') -> None:
    """Answer `count` requests on one connection, then close it (without warning)."""
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


async def test_tls_is_verified(nursery: trio.Nursery, certificate: tuple[Path, Path]) -> None:
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
    pool = Pool(f"https://localhost:{port}", max_connections=4, timeout=10, ssl_context=trusting)
    response = await pool.request("POST", "/graphql", [], b"{}")
    assert response.status == 200
    assert await response.next_chunk() == b'{"ok":1}'
    assert await response.next_chunk() is None
    await response.aclose()
    await pool.aclose()
    # The system's trust store does not know this certificate: no connection.
    untrusting = Pool(f"https://localhost:{port}", max_connections=4, timeout=10)
    with pytest.raises(UpstreamFailed, match="cannot connect"):
        await untrusting.request("GET", "/", [], b"")


async def test_a_connection_the_server_closed_while_idle_is_not_reused(
    nursery: trio.Nursery,
) -> None:
    connections = 0

    async def serve(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        await answer_requests(stream, 1)

    port = await plain_server(nursery, serve)
    pool = Pool(f"http://127.0.0.1:{port}", max_connections=4, timeout=10)
    for _ in range(3):
        response = await pool.request("POST", "/graphql", [], b"{}")
        assert response.status == 200
        while await response.next_chunk() is not None:
            pass
        await response.aclose()
        await trio.sleep(0.05)  # the server's close reaches us
    assert connections == 3
    await pool.aclose()


async def test_an_answer_cut_short_and_a_silent_server(nursery: trio.Nursery) -> None:
    async def cut_short(stream: trio.abc.Stream) -> None:
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await stream.aclose()

    pool = Pool(
        f"http://127.0.0.1:{await plain_server(nursery, cut_short)}", max_connections=1, timeout=5
    )
    response = await pool.request("GET", "/", [], b"")
    assert await response.next_chunk() == b"{"
    with pytest.raises(UpstreamFailed):
        await response.next_chunk()
    await response.aclose()

    async def silent(stream: trio.abc.Stream) -> None:
        await trio.sleep_forever()

    quiet = Pool(
        f"http://127.0.0.1:{await plain_server(nursery, silent)}", max_connections=1, timeout=0.2
    )
    with pytest.raises(UpstreamTimedOut):
        await quiet.request("GET", "/", [], b"")
    # The slot came back: a second request is not stuck behind the first.
    with pytest.raises(UpstreamTimedOut):
        await quiet.request("GET", "/", [], b"")
