"""The HTTP/1.1 server shell: h11 drives the protocol, trio the sockets, limits bound both.

Serves the emulator (the Merchant API proxy has its own reactor, broker/proxy/, with
the same limits and answers). A handler gets one `Exchange` per request: the head,
the body as chunks it pulls (so a large upload is never held whole), and calls to
answer in one go (`respond`) or stream (`start`, `send`, `end`).
A handler that returns without ending its response hangs up the connection, which is
how the emulator plays a server that dies mid-answer.

What a hostile peer can do, and what stops it:

- open connections and never send: `idle_timeout` closes them, `max_connections`
  bounds how many there are (beyond it a connection gets a 503 and is closed); an
  `Admission` (the proxy's) also turns a peer away at once by who it is (a uid that
  may do nothing here; one past its own share), so no one uid can hold every slot;
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
import http
import json
import socket as stdlib_socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import h11
import trio

from broker.http.door import DOOR_LINGER, MAX_LINGERING, RefusalLog, accept_or_pause
from broker.http.io import receive_some, send_all, waits
from broker.observe.log import events
from broker.policy.headers import overridden_length

log = events("broker.http")

_READ_SIZE: Final = 65536
#: How long a refused peer's leftover input is read and dropped before closing.
_LINGER: Final = 2.0
_LINGER_BYTES: Final = 4 * 1024 * 1024

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
        "_headers",
        "_pending",
        "_received",
        "_server",
        "body_done",
        "ended",
        "method",
        "must_close",
        "peer",
        "raw_headers",
        "sock",
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
        #: The stream's socket, read and written directly (broker/http/io.py).
        self.sock = stream.socket
        self.peer = peer
        self.method = head.method.decode("ascii")
        self.target = head.target.decode("latin-1")
        #: As h11 parsed (and validated) them: bytes, names lowercased, in order.
        self.raw_headers: list[tuple[bytes, bytes]] = [
            (name.lower(), value) for name, value in head.headers.raw_items()
        ]
        #: Both Content-Length and Transfer-Encoding: answered, then the connection
        #: closed (RFC 9112 6.1), so no byte of a smuggled message is read as the next.
        self.must_close = overridden_length(self.raw_headers)
        self._headers: Headers | None = None
        self._received = 0
        self.body_done = False
        self.started = False
        self.ended = False
        self._pending = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def headers(self) -> Headers:
        """Names lowercased (h11 does), values as sent, in order."""
        if self._headers is None:
            self._headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers
            ]
        return self._headers

    def header(self, name: str) -> str | None:
        """The last value of header `name` (lowercase), or None."""
        key = name.encode("latin-1")
        found = None
        for k, value in self.raw_headers:
            if k == key:
                found = value
        return None if found is None else found.decode("latin-1")

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
                try:
                    data = await receive_some(self.sock, trio.current_time() + limits.idle_timeout)
                except trio.TooSlowError:
                    raise BadHttp(408, "request_timeout", "the body stopped arriving") from None
                conn.receive_data(data)
                continue
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
        """The whole answer in one write. To a HEAD, the same head without the body
        (h11 refuses body bytes there: written, they would end the connection unanswered)."""
        conn = self._conn
        headers = [*headers, ("content-length", str(len(body)))]
        data = self._head(status, headers, close)
        if body and self.method != "HEAD":
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        self.ended = True
        await self._send(data)

    async def start(
        self, status: int, headers: Headers | list[tuple[bytes, bytes]], *, parsed: bool = False
    ) -> None:
        """The head; it goes out with the first `send` (or `end`): one write, not two,
        for an answer whose body is at hand.

        `parsed`: every name and value is bytes that came out of h11's parser (or was
        checked like it, e.g. rules.is_field_value), names lowercased; h11 then does
        not validate them again (its `_parsed` path, which its own reader uses)."""
        self._pending = self._head(status, headers, False, parsed)

    async def send(self, data: bytes) -> None:
        if data:
            await self._send(self._take_pending() + self._framed(h11.Data(data=data)))

    async def end(self) -> None:
        data = self._take_pending() + self._framed(h11.EndOfMessage())
        self.ended = True
        if data:
            await self._send(data)

    def _framed(self, event: h11.Data | h11.EndOfMessage) -> bytes:
        """`event` as bytes on the wire. A body that does not fit the framing its head
        declared (more or fewer bytes than its Content-Length) cannot be sent: the
        answer is abandoned and the connection hung up, with one log line."""
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError as exc:
            log.warning("answer_misframed", listener=self._server.name, reason=str(exc))
            raise HungUp from None

    def _take_pending(self) -> bytes:
        pending, self._pending = self._pending, b""
        return pending

    def _head(
        self,
        status: int,
        headers: Headers | list[tuple[bytes, bytes]],
        close: bool,
        parsed: bool = False,
    ) -> bytes:
        if parsed and self.must_close:
            headers = [*headers, (b"connection", b"close")]
        elif close or self.must_close:
            headers = [*headers, ("connection", "close")]
        self.started = True
        response = h11.Response(
            status_code=status,
            headers=headers,
            reason=_reason(status),
            _parsed=parsed,
        )
        data = self._conn.send(response)
        assert data is not None
        return data

    async def _send(self, data: bytes) -> None:
        deadline = trio.current_time() + self._server.limits.idle_timeout
        try:
            await send_all(self.sock, data, deadline)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            raise HungUp from None  # gone, or it stopped reading


Handler = Callable[[Exchange], Awaitable[None]]
#: Says who the peer of a new connection is (None: nobody we know); the exchange has it.
Identify = Callable[[trio.socket.SocketType], Any]
#: A refusal at the door: (status, code, message).
Refusal = tuple[int, str, str]


class Admission(Protocol):
    """Who may take a connection slot, decided when the connection is accepted (before
    it holds anything), and told when each admitted one ends."""

    def refusal(self, peer: Any, connections: int, limits: HttpLimits) -> Refusal | None: ...

    def opened(self, peer: Any) -> None: ...

    def closed(self, peer: Any) -> None: ...


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        limits: HttpLimits | None = None,
        *,
        identify: Identify | None = None,
        error_body: ErrorBody = plain_error,
        name: str = "http",
        admission: Admission | None = None,
        identify_blocks: bool = False,
        offload: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    ) -> None:
        self.handler = handler
        self.admission = admission
        #: `identify` may take long (reading /proc/net/tcp, whose size any local user
        #: grows): it runs in a worker thread, one at a time, never on the event loop.
        self._identify_blocks = identify_blocks
        #: How a blocking `identify` runs: a worker thread, or in place under tests'
        #: MockClock (a thread would let virtual time jump while it works).
        self._offload = offload
        #: Read per connection, so a reload's new limits apply to new connections.
        self.limits = limits or HttpLimits()
        self._identify = identify
        self._error_body = error_body
        self.name = name
        self.connections = 0
        #: Requests being handled right now.
        self.in_flight = 0
        self._quiet: trio.Event | None = None
        self._refusals = RefusalLog(name, log)
        self._lingering = 0

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
                    sock = await accept_or_pause(listener, self.name, log)
                except trio.ClosedResourceError:
                    break  # the owner closed the listener: connections carry on to the end
                if sock is None:
                    continue
                try:
                    peer = await self._peer(sock)
                except Exception:
                    # The peer is gone already (SO_PEERCRED on a reset connection), or a
                    # lookup failed: that connection, never the listener.
                    sock.close()
                    continue
                refusal = self._refusal(peer)
                if refusal is not None:
                    self._refusals.refused(refusal[1])
                    if self._lingering < MAX_LINGERING:
                        self._lingering += 1
                        nursery.start_soon(self._turn_away, sock, refusal, DOOR_LINGER)
                    else:  # a flood: answer and close at once (a reset may eat the answer)
                        await self._turn_away(sock, refusal, 0.0)
                    continue
                self.connections += 1
                if self.admission is not None:
                    self.admission.opened(peer)
                nursery.start_soon(self._connection, sock, peer)

    async def drained(self) -> None:
        """Return once no request is being handled (for a graceful stop)."""
        while self.in_flight:
            self._quiet = self._quiet or trio.Event()
            await self._quiet.wait()
            self._quiet = None

    async def _peer(self, sock: trio.socket.SocketType) -> Any:
        identify = self._identify
        if identify is None:
            return None
        if self._identify_blocks:
            return await self._offload(identify, sock)
        return identify(sock)

    def _refusal(self, peer: Any) -> Refusal | None:
        if self.admission is not None:
            return self.admission.refusal(peer, self.connections, self.limits)
        if self.connections >= self.limits.max_connections:
            return (503, "max_connections", "too many connections; try again")
        return None

    async def _turn_away(
        self, sock: trio.socket.SocketType, refusal: Refusal, linger: float
    ) -> None:
        """A refusal at the door: the answer into the fresh (empty) send buffer, our side
        shut, what the peer already sent read and dropped for up to `linger` seconds (so
        its request does not turn our answer into a reset), and close. Such a peer holds
        no connection slot; at most `MAX_LINGERING` linger at once, the rest are closed
        at once. The code in the body is `busy` for a 503, else the refusal's own."""
        status, reason, message = refusal
        code = "busy" if status == 503 else reason
        headers, body = self._error_body(status, code, message)
        lines = [f"{k}: {v}" for k, v in [*headers, ("content-length", str(len(body)))]]
        first = f"HTTP/1.1 {status} {_reason(status).decode('ascii')}"
        head = "\r\n".join([first, *lines, "connection: close"])
        try:
            with sock, contextlib.suppress(OSError):
                with trio.move_on_after(0.1):
                    await sock.send(head.encode("latin-1") + b"\r\n\r\n" + body)
                if linger > 0:
                    sock.shutdown(stdlib_socket.SHUT_WR)
                    with trio.move_on_after(linger):
                        for _ in range(16):
                            if not await sock.recv(_READ_SIZE):
                                break
        finally:
            if linger > 0:
                self._lingering -= 1

    async def _connection(self, sock: trio.socket.SocketType, peer: Any) -> None:
        stream = trio.SocketStream(sock)
        try:
            async with stream:
                await self._exchanges(stream, peer)
        except (HungUp, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # A bug while serving one connection ends that connection, not the server.
            log.exception("connection_failed", listener=self.name)
        finally:
            self.connections -= 1
            if self.admission is not None:
                self.admission.closed(peer)

    async def _exchanges(self, stream: trio.SocketStream, peer: Any) -> None:
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_size)
        while True:
            # The reads and writes below skip trio's scheduler when they need not wait;
            # a request served without any wait (pipelined, or refused at once) ends
            # with a checkpoint, so no connection can keep the others from running.
            mark = waits()
            try:
                head = await self._next_head(conn, stream.socket)
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
            if waits() == mark:
                await trio.lowlevel.checkpoint()

    async def _next_head(
        self, conn: h11.Connection, sock: trio.socket.SocketType
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
            try:
                data = await receive_some(sock, idle_until if head_until is None else head_until)
            except trio.TooSlowError:
                if head_until is None:
                    return None  # idle between requests: just close
                raise BadHttp(408, "request_timeout", "the request head took too long") from None
            conn.receive_data(data)
            if data and head_until is None:
                head_until = trio.current_time() + limits.header_timeout

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
