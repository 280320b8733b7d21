"""The proxy's upstream client: HTTP/1.1 keep-alive connections to one origin, on the
proxy's reactor, parsed by httptools (llhttp).

Why not httpx (the daemon's Geins auth client): measured with
`python -m benchmarks.upstream_pool`, httpx's pool and per-request machinery
cost 4x to 30x this pool's CPU per request (benchmarks/README.md); and why not trio streams: a
scheduler round trip per read and write (reactor.py). A request here is a head and a
body handed to `Pool.request` with a `Caller` that hears what happens; nothing awaits.

What a caller may rely on: one request per connection at a time; its `Caller` hears
`answer_head` once (1xx answers are skipped), then `answer_body` pieces, then
`answer_end`, or `upstream_failed` at any point (and nothing after it). A connection
goes back to the pool only after a complete exchange both sides may continue. An idle
connection the server closed is dropped as soon as the reactor sees it readable (EOF
or junk). A request is sent a second time only when that cannot make the origin act
on it twice (RFC 9110 9.2.2; Go's net/http `shouldRetryRequest` draws the same line):
on a reused connection, before any answer byte, once, on a fresh connection, and only
if its body is bytes and either its method is safe (GET, HEAD, OPTIONS, TRACE: then
after the connection ends, resets or refuses the write) or no byte of it was taken
by the socket (the write itself failed). A POST the origin may have read is never
sent again: an upstream that reads it and resets gets the caller a 502, not a second
order. So a request that is not safe, and a streamed body, are sent on a reused
connection only after it is checked (a peek); a safe one skips the peek, a close on
its way being caught by the retry. The answer must begin within `timeout` of the request,
and each later read of it must make progress within `timeout` (UpstreamTimedOut). A
message with both Content-Length and Transfer-Encoding is refused by the parser (RFC
9112 6.3 lets a recipient do so): a lying upstream gets a 502, never a re-framed
answer. TLS verifies the certificate and
host name with the system's trust store (or the context given), HTTP/1.1 by ALPN.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import math
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol
from urllib.parse import urlsplit

import httptools
import trio

from broker.policy.headers import is_field_value
from broker.proxy.reactor import BROKEN, IN, OUT, Reactor
from broker.proxy.transport import Plain, Tls, Transport

READ_SIZE: Final = 65536
#: The methods a request may be sent again with after the origin may have read it:
#: the safe ones (RFC 9110 9.2.1), the set Go's net/http replays on a reused connection.
SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
#: An idle connection older than this is closed rather than reused.
KEEPALIVE_EXPIRY: Final = 30.0
#: Requests waiting for a connection slot, at most (beyond: 503 busy).
MAX_WAITING: Final = 4096
#: An answer's head (with any 1xx heads before it) larger than this is a lying
#: upstream's (a 502): the parser holds an unfinished header line whole, and the
#: headers are kept until the head ends, so an unbounded head would be unbounded memory.
MAX_ANSWER_HEAD: Final = 256 * 1024
#: The peek's flags as a plain int (OR-ing socket's MsgFlag members per call costs an
#: enum construction).
_PEEK: Final = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)


class UpstreamFailed(Exception):
    """No answer: refused, reset, TLS or protocol failure (the proxy says 502)."""


class UpstreamTimedOut(UpstreamFailed):
    """No answer (or no more of it) within the timeout (the proxy says 504)."""


class Caller(Protocol):
    """Who hears about one upstream exchange (the proxy's request, handler.py)."""

    def answer_head(self, status: int, headers: list[tuple[bytes, bytes]], framed: bool) -> None:
        """`framed`: the body's length is known from the head (Content-Length, or no
        body), so it can be relayed byte for byte; else it must be re-framed."""

    def answer_body(self, data: bytes) -> None: ...

    def answer_end(self) -> None: ...

    def upstream_failed(self, exc: UpstreamFailed) -> None: ...

    def body_sent(self) -> None:
        """A streamed body's backlog went out: more of it may be read."""


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


class Pool:
    """Keep-alive connections to one origin, at most `max_connections` at once."""

    def __init__(
        self,
        reactor: Reactor,
        url: str,
        *,
        max_connections: int,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.reactor = reactor
        self.origin = Origin.of(url)
        host = self.origin.authority.encode("idna")
        if not is_field_value(host):
            raise ValueError(f"not a usable host: {self.origin.authority!r}")
        #: The start of every request head's header block.
        self.host_line = b"host: " + host + b"\r\n"
        self.base_path = self.origin.base_path.encode("latin-1")
        self.timeout = timeout
        self.max_connections = max_connections
        self.busy = 0
        self._idle: list[UpstreamConnection] = []
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._ssl = ssl_context
        if self.origin.scheme == "https" and self._ssl is None:
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        self.closed = False

    def request(
        self,
        caller: Caller,
        method: bytes,
        target: bytes,
        fields: bytes,
        body: bytes | None,
        *,
        head_only: bool = False,
    ) -> Exchange:
        """Start sending `method target` (appended to the base path) with the header
        lines `fields` (each ending in CRLF; the pool adds Host first) and `body`
        (bytes; None: streamed with `Exchange.send`)."""
        exchange = Exchange(
            self, caller, method, target, fields=fields, body=body, head_only=head_only
        )
        if not self.reactor.serving:
            self.reactor.tick()  # a caller that is a task, between the reactor's rounds
        if self.busy < self.max_connections:
            self._start(exchange)
        elif len(self._waiting) >= MAX_WAITING:
            caller.upstream_failed(UpstreamFailed("too many requests waiting for a connection"))
        else:
            self._waiting.append(_Pending(exchange))
        return exchange

    def _start(self, exchange: Exchange, *, fresh: bool = False) -> None:
        self.busy += 1
        now = self.reactor.now
        while self._idle and not fresh:
            conn = self._idle.pop()
            if (
                now - conn.idle_since < KEEPALIVE_EXPIRY
                and not conn.closed
                # A safe request is sent again if the server closed this one
                # meanwhile (`UpstreamConnection._stale`); any other is not.
                and (exchange.safe or conn.alive())
            ):
                conn.begin(exchange, reused=True)
                return
            conn.close()
        conn = UpstreamConnection(self)
        conn.begin(exchange, reused=False)
        host = self.origin.host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            self.reactor.spawn(self._resolve, conn, host)
        else:
            conn.connect([(socket.AF_INET6 if ":" in host else socket.AF_INET, host)])

    async def _resolve(self, conn: UpstreamConnection, host: str) -> None:
        """A host name is looked up by trio (in a worker thread), then connected to here."""
        try:
            infos = await trio.socket.getaddrinfo(host, self.origin.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.reactor.tick()
            conn.fail(UpstreamFailed(f"cannot resolve ({type(exc).__name__})"))
            return
        self.reactor.tick()
        if not conn.closed:
            conn.connect([(info[0], str(info[4][0])) for info in infos])

    def released(self, conn: UpstreamConnection, reusable: bool) -> None:
        """`conn` finished an exchange (and is kept if `reusable`): its slot is free."""
        self.busy -= 1
        if reusable and not self.closed:
            conn.idle_since = self.reactor.now
            self._idle.append(conn)
        else:
            conn.close()
        while self._waiting and self.busy < self.max_connections:
            pending = self._waiting.popleft()
            if not pending.exchange.cancelled:
                self._start(pending.exchange)

    def retry(self, exchange: Exchange) -> None:
        """Once more on a fresh connection (a stale keep-alive one failed)."""
        self._start(exchange, fresh=True)

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


@dataclass(slots=True)
class _Pending:
    exchange: Exchange


class Exchange:
    """One request on its way: what the proxy's request holds to stream a body up,
    hold back the answer (`pause`), or give up (`cancel`)."""

    __slots__ = (
        "body",
        "caller",
        "cancelled",
        "conn",
        "fields",
        "head_only",
        "method",
        "pool",
        "retried",
        "safe",
        "target",
    )

    def __init__(
        self,
        pool: Pool,
        caller: Caller,
        method: bytes,
        target: bytes,
        *,
        fields: bytes,
        body: bytes | None,
        head_only: bool,
    ) -> None:
        self.pool = pool
        self.caller = caller
        self.method = method
        self.target = target
        self.fields = fields
        self.body = body
        self.head_only = head_only
        self.conn: UpstreamConnection | None = None
        self.cancelled = False
        self.retried = False
        #: Sent again after the origin may have read it: a safe method, its body bytes.
        self.safe = body is not None and method in SAFE_METHODS

    def send(self, data: bytes) -> bool:
        """A piece of a streamed body (already framed); False: wait for `body_sent`."""
        conn = self.conn
        return conn is not None and conn.write_body(data)

    def finish(self) -> None:
        """A streamed body's last piece went to `send`."""
        if self.conn is not None:
            self.conn.body_done()

    def pause(self, paused: bool) -> None:
        """Stop (or resume) reading the answer: the caller's client is not keeping up."""
        if self.conn is not None:
            self.conn.pause(paused)

    def cancel(self) -> None:
        """The caller gave up: the connection (if any) is closed, nothing is heard."""
        self.cancelled = True
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abandon()


class UpstreamConnection:
    """One connection to the origin, on the reactor.

    Over the house's ~300 lines and ~15 attributes, on purpose: the origin's side of
    HTTP/1.1 (connect, TLS in memory, write, parse the answer with httptools, keep
    alive) as one state machine driven by epoll events, its fields slots read on each
    one; the pool that chooses connections is `Pool`, the TLS record layer `transport`.
    """

    __slots__ = (
        "_connecting",
        "_headers",
        "_name",
        "_paused",
        "_receive",
        "_want",
        "addresses",
        "answered",
        "closed",
        "deadline",
        "exchange",
        "fd",
        "head_bytes",
        "idle_since",
        "out",
        "parser",
        "pool",
        "reused",
        "sent",
        "sock",
        "status",
        "transport",
        "written",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.sock: socket.socket | None = None
        self.fd = -1
        self.transport: Transport | None = None
        self.exchange: Exchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.addresses: list[tuple[int, str]] = []
        self.out = bytearray()
        self.closed = False
        self.deadline = math.inf
        self.idle_since = 0.0
        self.reused = False
        #: Whether the whole request is out (a keep-alive connection needs it).
        self.sent = False
        #: Whether any byte of the answer came in (a retry is no longer safe).
        self.answered = False
        #: Whether the socket may have taken a byte of the request (a write did not
        #: fail): only a safe request is sent again then.
        self.written = False
        self.status = 0
        #: Bytes read before the answer's (final) head ended.
        self.head_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._name = b""
        self._connecting = False
        self._paused = False
        self._want = IN
        #: The transport's `receive` (a plain socket's own `recv`: one call less).
        self._receive: Callable[[int], bytes] = _not_connected
        #: Tracked from the start to `close` (deadline infinite while idle).
        pool.reactor.track(self)

    # -- connecting ------------------------------------------------------------------------

    def connect(self, addresses: list[tuple[int, str]]) -> None:
        self.addresses = addresses
        self._next_address()

    def _next_address(self) -> None:
        if self.sock is not None:
            self.pool.reactor.unregister(self.fd)
            self.sock.close()
            self.sock = None
        if not self.addresses:
            self.fail(UpstreamFailed("cannot connect (ConnectionRefusedError)"))
            return
        family, host = self.addresses.pop(0)
        sock = socket.socket(
            family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.fd = sock, sock.fileno()
        code = sock.connect_ex((host, self.pool.origin.port))
        if code not in (0, errno.EINPROGRESS):
            self._next_address()
            return
        self._connecting = True
        self._want = OUT
        self.pool.reactor.register(self.fd, self, OUT)

    def _connected(self) -> None:
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._next_address()
            return
        self._connecting = False
        context = self.pool._ssl
        if context is None:
            self.transport = Plain(self.sock)
            self._receive = self.sock.recv
        else:
            self.transport = Tls(self.sock, context, self.pool.origin.host)
            self._receive = self.transport.receive
        self._set_interest(IN)
        self._flush_request()

    # -- one exchange ----------------------------------------------------------------------

    def begin(self, exchange: Exchange, *, reused: bool) -> None:
        exchange.conn = self
        self.exchange = exchange
        self.reused = reused
        self.sent = self.answered = self.written = False
        self.status = self.head_bytes = 0
        self._headers = []
        pool = self.pool
        self.deadline = deadline = pool.reactor.now + pool.timeout
        pool.reactor.watch(deadline)
        body = exchange.body
        data = b"".join(
            (
                exchange.method,
                b" ",
                pool.base_path,
                exchange.target,
                b" HTTP/1.1\r\n",
                pool.host_line,
                exchange.fields,
                b"\r\n",
                b"" if body is None else body,
            )
        )
        if body is not None:
            self.sent = True
        if reused and not self.out:
            if self._write(data):
                exchange.caller.body_sent()
            return
        self.out += data
        if reused:
            self._flush_request()

    def write_body(self, data: bytes) -> bool:
        """More of a streamed body, framed; False: wait for the caller's `body_sent`."""
        if self.closed:
            return False
        if self.transport is None or self.transport.handshaking:
            self.out += data
            return False
        return self._write(data)

    def body_done(self) -> None:
        self.sent = True

    def _flush_request(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if transport.handshaking:
            self._handshake()
            return
        data, self.out = self.out, bytearray()
        if data and self._write(data) and self.exchange is not None:
            self.exchange.caller.body_sent()

    def _write(self, data: bytes | bytearray) -> bool:
        transport = self.transport
        assert transport is not None
        try:
            done = transport.write(data)
        except (OSError, ssl.SSLError) as exc:
            # One failed send took nothing: if none before it took anything either,
            # no byte of this request reached the origin.
            if not self._stale():
                self.fail(UpstreamFailed(f"sending failed ({type(exc).__name__})"))
            return False
        self.written = True
        if not done:
            self._set_interest(self._want | OUT)
        return done

    def _flushed(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            done = transport.flush()
        except (OSError, ssl.SSLError) as exc:
            self.fail(UpstreamFailed(f"sending failed ({type(exc).__name__})"))
            return
        if done:
            self._set_interest(self._want & ~OUT)
            exchange = self.exchange
            if exchange is not None:
                exchange.caller.body_sent()

    def _handshake(self) -> None:
        transport = self.transport
        assert isinstance(transport, Tls)
        try:
            done = transport.handshake()
        except (OSError, ssl.SSLError) as exc:
            self.fail(UpstreamFailed(f"cannot connect (TLS: {exc})"))
            return
        if done:
            self._flush_request()
        elif transport.pending:
            self._set_interest(self._want | OUT)

    def _set_interest(self, mask: int) -> None:
        if mask != self._want and not self.closed:
            self._want = mask
            self.pool.reactor.modify(self.fd, mask if not self._paused else mask & ~IN)

    def pause(self, paused: bool) -> None:
        """While paused, the caller's client is what is slow (its own idle timeout
        governs), so the upstream's read timeout stops, and starts afresh on resume."""
        if paused != self._paused and not self.closed and self.transport is not None:
            self._paused = paused
            self.pool.reactor.modify(self.fd, self._want & ~IN if paused else self._want)
            if paused:
                self.deadline = math.inf
            elif self.exchange is not None:
                self.deadline = self.pool.reactor.now + self.pool.timeout
                self.pool.reactor.watch(self.deadline)

    # -- events ----------------------------------------------------------------------------

    def on_event(self, events: int) -> None:
        if self._connecting:
            self._connected()
            return
        transport = self.transport
        assert transport is not None
        if transport.handshaking:
            self._handshake()
            return
        if events & OUT:
            self._flushed()
            if self.closed:
                return
        if events & BROKEN and (self._paused or not self._want & IN):
            self.fail(UpstreamFailed("the connection broke"))
            return
        if events & ~OUT and not self._paused:
            self._read()

    def _read(self) -> None:
        try:
            data = self._receive(READ_SIZE)
        except BlockingIOError:
            return
        except (OSError, ssl.SSLError) as exc:
            if not self._stale():
                self.fail(UpstreamFailed(f"reading failed ({type(exc).__name__})"))
            return
        if self.exchange is None:
            self.close()  # junk or a close while idle: not reusable
            return
        if not data:
            self._eof()
            return
        self.answered = True
        self.deadline = self.pool.reactor.now + self.pool.timeout
        heading = not self.status
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.exchange is not None:
                self.fail(UpstreamFailed(f"the upstream broke HTTP ({_reason(exc)})"))
            return
        if heading and not self.status and self.exchange is not None:
            # Still in the head after this read: at most one read past the bound is held.
            self.head_bytes += len(data)
            if self.head_bytes > MAX_ANSWER_HEAD:
                self.fail(UpstreamFailed("the upstream's answer head is too large"))

    def _eof(self) -> None:
        if self.status and not _has_length(self._headers) and self.exchange is not None:
            self.on_message_complete()  # a body delimited by the close
            self.close()
            return
        if self._stale():
            return
        if self.status:
            self.fail(UpstreamFailed("the upstream closed the connection mid-answer"))
        else:
            self.fail(UpstreamFailed("the upstream closed the connection without answering"))

    def _stale(self) -> bool:
        """Whether this was a kept-alive connection the server had closed (it ended,
        reset or refused the request before any answer byte): then the request is sent
        once more on a fresh connection if that cannot have it acted on twice: it is
        safe (its body bytes), or none of it was written (and its body is bytes)."""
        exchange = self.exchange
        if (
            not self.reused
            or self.answered
            or exchange is None
            or exchange.body is None
            or exchange.retried
            or (self.written and not exchange.safe)
        ):
            return False
        exchange.retried = True
        self.exchange = None
        exchange.conn = None
        self.pool.busy -= 1
        self.close()
        self.pool.retry(exchange)
        return True

    def expire(self, now: float) -> None:
        if self.exchange is None:
            self.deadline = math.inf
            return
        if self.status:
            self.fail(UpstreamTimedOut("the upstream stopped sending"))
        else:
            self.fail(UpstreamTimedOut("the upstream did not answer in time"))

    # -- httptools' callbacks --------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            self._headers = []  # 1xx: skipped, the real answer follows
            return
        self.status = status
        exchange = self.exchange
        if exchange is not None:
            head_only = exchange.head_only or status in (204, 304)
            framed = head_only or b"content-length" in dict(self._headers)
            exchange.caller.answer_head(status, self._headers, framed)
            if head_only and self.exchange is exchange:
                # The answer to HEAD has no body whatever its Content-Length says,
                # which httptools cannot be told: the exchange ends here, and the
                # connection is not reused (its parser would wait for that body).
                self.sent = False
                self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None and self.status:
            exchange.caller.answer_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None or not self.status:
            return
        self.exchange = None
        exchange.conn = None
        self.deadline = math.inf
        pending = self.out or (self.transport is not None and self.transport.pending)
        reusable = self.sent and not pending and self.parser.should_keep_alive()
        if reusable:
            self.parser = httptools.HttpResponseParser(self)
        self.pool.released(self, reusable)
        exchange.caller.answer_end()

    # -- the end ---------------------------------------------------------------------------

    def fail(self, exc: UpstreamFailed) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.conn = None
            self.pool.released(self, False)
            exchange.caller.upstream_failed(exc)
        else:
            self.close()

    def abandon(self) -> None:
        """The caller left: no more of this exchange, and the connection cannot be reused."""
        if self.exchange is not None:
            self.exchange = None
            self.pool.released(self, False)
        else:
            self.close()

    def abort(self) -> None:
        self.fail(UpstreamFailed("internal error"))

    def alive(self) -> bool:
        """An idle connection that reads as ready was closed by the server (or it sent
        junk): not reusable."""
        sock = self.sock
        if sock is None or self.closed:
            return False
        try:
            sock.recv(1, _PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.reactor.untrack(self)
        if self.sock is not None:
            self.pool.reactor.unregister(self.fd)
            self.sock.close()


def _not_connected(size: int) -> bytes:
    raise BlockingIOError  # an event before the connection is made: nothing to read


def _has_length(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the body's end is framed (a length, or chunked), not the close."""
    for name, value in headers:
        if name == b"content-length":
            return True
        if name == b"transfer-encoding" and value.lower().endswith(b"chunked"):
            return True
    return False


def _reason(exc: httptools.HttpParserError) -> str:
    return str(exc) or type(exc).__name__
