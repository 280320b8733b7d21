"""The HTTP/1.1 server shell: h11 drives the protocol, trio the sockets, limits bound both.

Shared by the emulator and the Merchant API proxy. A handler gets one `Exchange` per
request: the head, the body as chunks it pulls (so a large upload is never held
whole), and calls to answer in one go (`respond`) or stream (`start`, `send`, `end`).
A handler that returns without ending its response hangs up the connection, which is
how the emulator plays a server that dies mid-answer.

What a hostile peer can do, and what stops it:

- open connections and never send: `idle_timeout` closes them, `max_connections`
  bounds how many there are (beyond it a connection gets a 503 and is closed);
- trickle a request head byte by byte (slowloris): the whole head must arrive within
  `header_timeout` of its first byte, or it gets a 408;
- send a huge head: h11 buffers at most `max_header_size` bytes of an incomplete
  event, then the peer gets a 431;
- send a huge body: a declared Content-Length over `max_body_size` gets a 413 before
  a byte of it is read; a chunked body is counted as it arrives;
- trickle a body, or never read the answer: every read of the body and every write of
  the answer must make progress within `idle_timeout`;
- send garbage: h11 refuses it, the peer gets a 400.

Every refusal is an answer with `Connection: close`, followed by a clean close: our
side is shut for writing first and what the peer still sends is read and dropped for
a moment (`_LINGER`), so its kernel does not turn our answer into a reset.
"""

from __future__ import annotations

import contextlib
import errno
import http
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import h11
import trio

from ..log import events

log = events("broker.http")

_READ_SIZE: Final = 65536
#: How long a refused peer's leftover input is read and dropped before closing.
_LINGER: Final = 2.0
_LINGER_BYTES: Final = 4 * 1024 * 1024
#: accept() errors that mean "out of resources" (trio's ACCEPT_CAPACITY_ERRNOS).
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_PAUSE: Final = 0.1

Headers = list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_connections: int = 256
    max_header_size: int = 16 * 1024
    max_body_size: int = 10 * 1024 * 1024
    #: Seconds from a request head's first byte to its last.
    header_timeout: float = 10.0
    #: Seconds a keep-alive connection may sit between requests, and the most any one
    #: read of a body or write of an answer may take.
    idle_timeout: float = 60.0


class BadHttp(Exception):
    """The request cannot be served: answered with `status` and the connection closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HungUp(Exception):
    """The peer went away (or stopped reading): nothing more to say to it."""


#: Renders a refusal: (status, code, message) -> (headers, body).
ErrorBody = Callable[[int, str, str], tuple[Headers, bytes]]


def plain_error(status: int, code: str, message: str) -> tuple[Headers, bytes]:
    body = json.dumps({"error": message, "code": code}, separators=(",", ":")).encode()
    return [("content-type", "application/json")], body


class Exchange:
    """One request and its answer, as a handler sees them."""

    __slots__ = (
        "_conn",
        "_pending",
        "_received",
        "_server",
        "body_done",
        "ended",
        "headers",
        "method",
        "peer",
        "started",
        "stream",
        "target",
    )

    def __init__(
        self,
        server: HttpServer,
        conn: h11.Connection,
        stream: trio.SocketStream,
        head: h11.Request,
        peer: Any,
    ) -> None:
        self._server = server
        self._conn = conn
        self.stream = stream
        self.peer = peer
        self.method = head.method.decode("ascii")
        self.target = head.target.decode("latin-1")
        #: Names lowercased (h11 does), values as sent, in order.
        self.headers: Headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers
        ]
        self._received = 0
        self.body_done = False
        self.started = False
        self.ended = False
        self._pending = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        """The last value of header `name` (lowercase), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    # -- the body ---------------------------------------------------------------------------

    async def next_chunk(self) -> bytes | None:
        """The next piece of the body; None at its end. Raises BadHttp past the limits."""
        if self.body_done:
            return None
        conn, limits = self._conn, self._server.limits
        if conn.they_are_waiting_for_100_continue:
            await self._send(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadHttp(400, "bad_request", f"malformed request body: {exc}") from None
            if event is h11.NEED_DATA:
                with trio.move_on_after(limits.idle_timeout):
                    conn.receive_data(await _receive(self.stream))
                    continue
                raise BadHttp(408, "request_timeout", "the request body stopped arriving")
            if isinstance(event, h11.Data):
                self._received += len(event.data)
                if self._received > limits.max_body_size:
                    raise BadHttp(
                        413, "request_too_large", f"body over {limits.max_body_size} bytes"
                    )
                if event.data:
                    return bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return None
            else:
                raise HungUp

    async def read_body(self) -> bytes:
        """The whole body (at most `max_body_size`)."""
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)

    # -- the answer -------------------------------------------------------------------------

    async def respond(
        self, status: int, headers: Headers, body: bytes = b"", *, close: bool = False
    ) -> None:
        """The whole answer in one write."""
        conn = self._conn
        headers = [*headers, ("content-length", str(len(body)))]
        data = self._head(status, headers, close)
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.ended = True
        await self._send(data)

    async def start(self, status: int, headers: Headers) -> None:
        """The head; it goes out with the first `send` (or `end`): one write, not two,
        for an answer whose body is at hand."""
        self._pending = self._head(status, headers, False)

    async def send(self, data: bytes) -> None:
        if data:
            await self._send(self._take_pending() + (self._conn.send(h11.Data(data=data)) or b""))

    async def end(self) -> None:
        self.ended = True
        data = self._take_pending() + (self._conn.send(h11.EndOfMessage()) or b"")
        if data:
            await self._send(data)

    def _take_pending(self) -> bytes:
        pending, self._pending = self._pending, b""
        return pending

    def _head(self, status: int, headers: Headers, close: bool) -> bytes:
        if close:
            headers = [*headers, ("connection", "close")]
        self.started = True
        response = h11.Response(status_code=status, headers=headers, reason=_reason(status))
        data = self._conn.send(response)
        assert data is not None
        return data

    async def _send(self, data: bytes) -> None:
        with trio.move_on_after(self._server.limits.idle_timeout):
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise HungUp from None
            return
        raise HungUp  # the peer stopped reading


Handler = Callable[[Exchange], Awaitable[None]]
#: Says who the peer of a new connection is (None: nobody we know); the exchange has it.
Identify = Callable[[trio.socket.SocketType], Any]


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits | None = None,
        *,
        identify: Identify | None = None,
        error_body: ErrorBody = plain_error,
        name: str = "http",
    ) -> None:
        self.handler = handler
        #: Read per connection, so a reload's new limits apply to new connections.
        self.limits = limits or HttpLimits()
        self._identify = identify
        self._error_body = error_body
        self.name = name
        self.connections = 0
        #: Requests being handled right now.
        self.in_flight = 0
        self._quiet: trio.Event | None = None

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on `listener` until cancelled or until it is closed; the connections
        live as long as this call."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    sock, _ = await listener.accept()
                except trio.ClosedResourceError:
                    break  # the owner closed the listener: connections carry on to the end
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    log.warning("accept_paused", listener=self.name, reason=exc.strerror)
                    await trio.sleep(_ACCEPT_PAUSE)
                    continue
                if self.connections >= self.limits.max_connections:
                    await self._busy(sock)
                    continue
                self.connections += 1
                nursery.start_soon(self._connection, sock)

    async def drained(self) -> None:
        """Return once no request is being handled (for a graceful stop)."""
        while self.in_flight:
            self._quiet = self._quiet or trio.Event()
            await self._quiet.wait()
            self._quiet = None

    async def _busy(self, sock: trio.socket.SocketType) -> None:
        """Over `max_connections`: a 503 into the fresh (empty) send buffer, and close."""
        headers, body = self._error_body(503, "busy", "too many connections; try again")
        lines = [f"{k}: {v}" for k, v in [*headers, ("content-length", str(len(body)))]]
        head = "\r\n".join(["HTTP/1.1 503 Service Unavailable", *lines, "connection: close"])
        with sock, trio.move_on_after(0.1), contextlib.suppress(OSError):
            await sock.send(head.encode("latin-1") + b"\r\n\r\n" + body)
        log.warning("connection_refused", listener=self.name, reason="max_connections")

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        stream = trio.SocketStream(sock)
        try:
            async with stream:
                peer = self._identify(sock) if self._identify is not None else None
                await self._exchanges(stream, peer)
        except (HungUp, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # A bug while serving one connection ends that connection, not the server.
            log.exception("connection_failed", listener=self.name)
        finally:
            self.connections -= 1

    async def _exchanges(self, stream: trio.SocketStream, peer: Any) -> None:
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_size)
        while True:
            try:
                head = await self._next_head(conn, stream)
                if head is None:
                    return
                exchange = Exchange(self, conn, stream, head, peer)
                _check_declared_length(exchange, limits.max_body_size)
                self.in_flight += 1
                try:
                    await self.handler(exchange)
                finally:
                    self.in_flight -= 1
                    if self.in_flight == 0 and self._quiet is not None:
                        self._quiet.set()
            except BadHttp as bad:
                await self._refuse(conn, stream, bad)
                return
            if not exchange.ended:
                return  # the handler hung up (or left its answer unfinished)
            if conn.their_state is h11.SEND_BODY:
                # Answered without reading the whole body: read the rest (within the
                # limits) so the connection can carry the next request.
                try:
                    while await exchange.next_chunk() is not None:
                        pass
                except BadHttp:
                    return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _next_head(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> h11.Request | None:
        """The next request head; None when the peer closes or idles out between requests."""
        limits = self.limits
        now = trio.current_time()
        idle_until = now + limits.idle_timeout
        # Pipelined bytes already here: the head has begun.
        head_until = now + limits.header_timeout if conn.trailing_data[0] else None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                code = "headers_too_large" if status == 431 else "bad_request"
                raise BadHttp(status, code, f"bad request: {exc}") from None
            if isinstance(event, h11.Request):
                # h11 bounds only an incomplete head; one that arrived whole in a
                # single read is measured here.
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > limits.max_header_size:
                    raise BadHttp(431, "headers_too_large", "request head too large")
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed
            with trio.move_on_at(head_until if head_until is not None else idle_until):
                data = await _receive(stream)
                conn.receive_data(data)
                if data and head_until is None:
                    head_until = trio.current_time() + limits.header_timeout
                continue
            if head_until is None:
                return None  # idle between requests: just close
            raise BadHttp(408, "request_timeout", "the request head took too long")

    async def _refuse(self, conn: h11.Connection, stream: trio.SocketStream, bad: BadHttp) -> None:
        """Answer a refusal (if an answer can still be sent), then close cleanly."""
        log.info("request_refused", listener=self.name, status=bad.status, code=bad.code)
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            headers, body = self._error_body(bad.status, bad.code, str(bad))
            headers = [*headers, ("content-length", str(len(body))), ("connection", "close")]
            response = h11.Response(
                status_code=bad.status, headers=headers, reason=_reason(bad.status)
            )
            try:
                data = (conn.send(response) or b"") + (conn.send(h11.Data(data=body)) or b"")
                data += conn.send(h11.EndOfMessage()) or b""
            except h11.LocalProtocolError:
                return
            with trio.move_on_after(self.limits.idle_timeout):
                await stream.send_all(data)
        await _linger(stream)


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return bytes(await stream.receive_some(_READ_SIZE))
    except trio.BrokenResourceError:
        return b""


async def _linger(stream: trio.SocketStream) -> None:
    """Shut our side, then drop what the peer still sends, for a moment: closing with
    unread input makes the kernel send a reset, which can destroy our last answer."""
    try:
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    dropped = 0
    with trio.move_on_after(_LINGER):
        while dropped < _LINGER_BYTES:
            data = await _receive(stream)
            if not data:
                return
            dropped += len(data)


def _check_declared_length(exchange: Exchange, limit: int) -> None:
    declared = exchange.header("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadHttp(413, "request_too_large", f"body over {limit} bytes")


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""
