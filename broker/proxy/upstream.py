"""The proxy's upstream client: HTTP/1.1 keep-alive connections to one origin, h11 on trio.

Why not httpx here (the rest of the daemon uses it for Geins' auth calls, and the issue
asked for it): measured with `python -m benchmarks.upstream_pool` (the client alone, N
trio tasks against the nginx stub, every client in the same run; benchmarks/README.md),
httpx 0.28.1 / httpcore 1.0.9 with limits sized like the proxy's (256 connections, 256
kept alive) did 0.25x / 0.17x / 0.03x this pool's req/s at 1 / 16 / 64 callers; with
httpx's default limits 0.25x / 0.14x / 0.12x. Not the limits, then, but two things:
httpcore's pool rescans every connection for each connection on every pass
(`_assign_requests_to_connections`: `len([c.is_idle() for c in self._connections])`
inside a loop over the connections, ~1,600 `is_idle` calls per request at 64 callers;
encode/httpcore#1035 and #1000, open and unreleased), and httpx's per-request machinery
(models, context managers, cancel scopes: ~1,200 Python calls a request), which is why
even one caller is 4x slower. The pydantic/httpx2 fork carries the pool fix (its
#974, #1075) and still reached only 0.34x / 0.35x / 0.26x. The proxy's whole job is
this one exchange, so it gets the same shape as the server side: h11 for the
protocol, trio for the sockets, a pool of idle connections per origin.

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

from broker.http.io import receive_some, send_all
from broker.policy.headers import is_field_value

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
    __slots__ = ("_poller", "h11", "idle_since", "sock", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        #: Plain TCP: the socket, read and written directly (broker/http/io.py);
        #: None under TLS, where the SSLStream does the I/O.
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self._poller: select.poll | None = None

    async def send_all(self, data: bytes) -> None:
        if self.sock is not None:
            await send_all(self.sock, data)
        else:
            await self.stream.send_all(data)

    async def receive_some(self, deadline: float) -> bytes:
        """Raises trio.TooSlowError if nothing came by `deadline`."""
        if self.sock is not None:
            return await receive_some(self.sock, deadline)
        with trio.move_on_at(deadline):
            return bytes(await self.stream.receive_some(_READ_SIZE))
        raise trio.TooSlowError

    def socket_readable(self) -> bool:
        """Readable while idle means the server closed it (or sent junk): not reusable."""
        poller = self._poller
        if poller is None:
            sock = self.sock
            if sock is None:
                inner = getattr(self.stream, "transport_stream", None)
                sock = getattr(inner, "socket", None)
            if sock is None:
                return True
            # A poll object is a list of descriptors in user space (the kernel sees
            # it only during poll()): kept for the connection's life, it costs nothing.
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class Response:
    """Status and headers at once; the body pulled with `next_chunk`. `aclose` always."""

    def __init__(self, pool: Pool, conn: _Connection, head: h11.Response) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status = head.status_code
        #: As h11 parsed (and validated) them: bytes, names lowercased, in order.
        self.headers = [(name.lower(), value) for name, value in head.headers.raw_items()]

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
        self._host = self.origin.authority.encode("idna")
        self._host_checked = is_field_value(self._host)
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
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        *,
        parsed: bool = False,
    ) -> Response:
        """Send; return once the answer's head is in (within `timeout`).

        `parsed`: every header name and value came out of h11's parser or was
        checked with rules.is_field_value (names lowercased), so h11 need not validate
        them again."""
        try:
            self._slots.acquire_nowait()  # no trip through the scheduler while there is room
        except trio.WouldBlock:
            await self._slots.acquire()
        # A bare cancel scope: trio.fail_after is a generator-based context manager,
        # a measurable cost on a path taken once per proxied request.
        scope = trio.CancelScope(deadline=trio.current_time() + self.timeout)
        try:
            with scope:
                return await self._exchange(method, target, headers, body, parsed)
        except BaseException:
            self._slots.release()
            raise
        # Only reached when the scope's deadline cancelled the exchange.
        self._slots.release()
        raise UpstreamTimedOut("the upstream did not answer in time")

    async def _exchange(
        self,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        parsed: bool,
    ) -> Response:
        head = [(b"host", self._host), *headers]
        if isinstance(body, bytes):
            head.append((b"content-length", b"%d" % len(body)))
        elif not any(k == b"content-length" for k, _ in headers):
            head.append((b"transfer-encoding", b"chunked"))
        request = h11.Request(
            method=method.encode("ascii"),
            target=(self.origin.base_path + target).encode("latin-1"),
            headers=head,
            _parsed=parsed and self._host_checked,
        )
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
                await conn.send_all(data + (protocol.send(h11.EndOfMessage()) or b""))
                return
            await conn.send_all(data)
            async for chunk in body:
                if chunk:
                    await conn.send_all(protocol.send(h11.Data(data=chunk)) or b"")
            await conn.send_all(protocol.send(h11.EndOfMessage()) or b"")
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamFailed(f"sending failed ({type(exc).__name__})") from None
        except h11.LocalProtocolError as exc:
            # A body that does not match the length its head declared.
            raise UpstreamFailed(f"the request could not be framed ({exc})") from None

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
            try:
                data = await conn.receive_some(trio.current_time() + self.timeout)
            except trio.TooSlowError:
                raise UpstreamTimedOut("the upstream stopped sending") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamFailed(f"reading failed ({type(exc).__name__})") from None
            protocol.receive_data(data)

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
