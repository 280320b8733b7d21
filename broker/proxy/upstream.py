"""The proxy's upstream client: HTTP/1.1 keep-alive connections to one origin, h11 on trio.

Why not httpx here (the rest of the daemon uses it for Geins' auth calls): measured on
this project's VM (benchmarks/README.md), httpx's pool under trio costs ~0.7 ms per
request at one connection and collapses under concurrency (its pool rescans every
connection for every queued request and retries on contention: 70 req/s at 64
concurrent callers). The proxy's whole job is this one exchange, so it gets the same
shape as the server side: h11 for the protocol, trio for the sockets, a pool of idle
connections per origin.

What a caller may rely on: one request per connection at a time; a connection goes back
to the pool only after a complete exchange that both sides may continue; an idle
connection the server closed is noticed before reuse (it turns readable), and a
request whose reused connection fails before any answer byte is sent again once on a
fresh connection, if its body is replayable (bytes). TLS verifies the certificate and
host name with the system's trust store (or the context given), HTTP/1.1 by ALPN.
"""

from __future__ import annotations

import contextlib
import select
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import h11
import trio

_READ_SIZE: Final = 65536
#: An idle connection older than this is closed rather than reused.
KEEPALIVE_EXPIRY: Final = 30.0


class UpstreamFailed(Exception):
    """No answer: refused, reset, TLS or protocol failure (the proxy says 502)."""


class UpstreamTimedOut(UpstreamFailed):
    """No answer (or no more of it) within the timeout (the proxy says 504)."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    #: The Host header, and the base path requests are appended to.
    authority: str
    base_path: str

    @classmethod
    def of(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.netloc, parts.path.rstrip("/"))


class _Connection:
    __slots__ = ("h11", "idle_since", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0

    def socket_readable(self) -> bool:
        """Readable while idle means the server closed it (or sent junk): not reusable."""
        sock = getattr(self.stream, "socket", None)
        if sock is None:
            inner = getattr(self.stream, "transport_stream", None)
            sock = getattr(inner, "socket", None)
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class Response:
    """Status and headers at once; the body pulled with `next_chunk`. `aclose` always."""

    def __init__(self, pool: Pool, conn: _Connection, head: h11.Response) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = head.status_code
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers]

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        conn = self._conn
        assert conn is not None
        while True:
            event = await self._pool.next_event(conn)
            if isinstance(event, h11.Data):
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return None
            else:
                raise UpstreamFailed("the upstream closed the connection mid-answer")

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)


class Pool:
    """Keep-alive connections to one origin, at most `max_connections` at once."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.origin = Origin.of(url)
        self.timeout = timeout
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._ssl = ssl_context
        if self.origin.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        self.closed = False

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes],
    ) -> Response:
        """Send; return once the answer's head is in (within `timeout`)."""
        await self._slots.acquire()
        try:
            with trio.fail_after(self.timeout):
                return await self._exchange(method, target, headers, body)
        except trio.TooSlowError:
            self._slots.release()
            raise UpstreamTimedOut("the upstream did not answer in time") from None
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes],
    ) -> Response:
        head = [("host", self.origin.authority), *headers]
        if isinstance(body, bytes):
            head.append(("content-length", str(len(body))))
        elif not any(k == "content-length" for k, _ in headers):
            head.append(("transfer-encoding", "chunked"))
        request = h11.Request(method=method, target=self.origin.base_path + target, headers=head)
        while True:
            conn, reused = await self._connection()
            try:
                await self._send(conn, request, body)
                event = await self.next_event(conn)
                while isinstance(event, h11.InformationalResponse):
                    event = await self.next_event(conn)
            except UpstreamFailed:
                await _close(conn)
                if reused and isinstance(body, bytes):
                    continue  # a stale keep-alive connection: once more, on a fresh one
                raise
            except BaseException:
                await _close(conn)
                raise
            if not isinstance(event, h11.Response):
                await _close(conn)
                raise UpstreamFailed("the upstream closed the connection without answering")
            return Response(self, conn, event)

    async def _connection(self) -> tuple[_Connection, bool]:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since < KEEPALIVE_EXPIRY and not conn.socket_readable():
                return conn, True
            await _close(conn)
        origin = self.origin
        try:
            tcp = await trio.open_tcp_stream(origin.host, origin.port)
        except OSError as exc:
            raise UpstreamFailed(f"cannot connect ({type(exc).__name__})") from None
        if self._ssl is None:
            return _Connection(tcp), False
        tls = trio.SSLStream(tcp, self._ssl, server_hostname=origin.host, https_compatible=True)
        try:
            await tls.do_handshake()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(tcp)
            if isinstance(exc, trio.BrokenResourceError | ssl.SSLError | OSError):
                raise UpstreamFailed(f"cannot connect (TLS: {exc.__cause__ or exc})") from None
            raise
        return _Connection(tls), False

    async def _send(
        self, conn: _Connection, request: h11.Request, body: bytes | AsyncIterator[bytes]
    ) -> None:
        protocol = conn.h11
        try:
            data = protocol.send(request) or b""
            if isinstance(body, bytes):
                if body:
                    data += protocol.send(h11.Data(data=body)) or b""
                await conn.stream.send_all(data + (protocol.send(h11.EndOfMessage()) or b""))
                return
            await conn.stream.send_all(data)
            async for chunk in body:
                if chunk:
                    await conn.stream.send_all(protocol.send(h11.Data(data=chunk)) or b"")
            await conn.stream.send_all(protocol.send(h11.EndOfMessage()) or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamFailed(f"sending failed ({type(exc).__name__})") from None

    async def next_event(self, conn: _Connection) -> object:
        """The next h11 event from the upstream; a read waits at most `timeout`."""
        protocol = conn.h11
        while True:
            try:
                event = protocol.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamFailed(f"the upstream broke HTTP ({exc})") from None
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise UpstreamFailed("the upstream closed the connection")
                return event
            with trio.move_on_after(self.timeout) as scope:
                try:
                    data = await conn.stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise UpstreamFailed(f"reading failed ({type(exc).__name__})") from None
            if scope.cancelled_caught:
                raise UpstreamTimedOut("the upstream stopped sending")
            protocol.receive_data(bytes(data))

    async def release(self, conn: _Connection) -> None:
        """Back to the pool if the exchange completed and both sides keep the connection."""
        self._slots.release()
        protocol = conn.h11
        if not self.closed and protocol.our_state is h11.DONE and protocol.their_state is h11.DONE:
            protocol.start_next_cycle()
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            await _close(conn)

    async def aclose(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close(conn)


_CLOSE_ERRORS: Final = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


async def _close(conn: _Connection) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(*_CLOSE_ERRORS):
        await conn.stream.aclose()
