"""One caller's connection to the proxy, on the reactor: httptools parses, limits bound.

The parser's callbacks only record (the request line, headers, pieces of body) into
`Request`s; after each read, `_advance` hands the first request to the proxy
(`App.begin`) and its body as it comes, so no callback ever re-enters the parser.
Requests are answered in order, one at a time: once a request behind the current one
begins, reading stops until the current answer is out (the rest waits in the kernel;
what came in the same read is held: at most one read's worth). A caller that shuts
its side after a whole request still gets the answer, then the connection closes.

What a hostile peer can do, and what stops it (the limits of broker/http/server.py,
the same settings, the same answers):

- never send, or idle between requests: closed after `idle_timeout`;
- trickle a request head (slowloris): it must be whole within `header_timeout` of its
  first byte, or it gets a 408;
- send a huge head: past `max_header_size` bytes it gets a 431 (counted as it
  arrives, so an unfinished head is bounded too);
- send a huge body: a declared Content-Length over `max_body_size` gets a 413 before a
  byte of it is read, and a chunked body is counted as it arrives;
- trickle a body or never read the answer: each read of the body and each write of
  the answer must make progress within `idle_timeout`;
- send garbage, contradictory framing (Content-Length with Transfer-Encoding, two
  lengths), an Upgrade or CONNECT: llhttp refuses it, the peer gets a 400.

Every refusal is an answer with `Connection: close`, then a clean close: our side shut
for writing and what the peer still sends read and dropped for a moment (`LINGER`,
at most `LINGER_BYTES`), so its kernel does not turn our answer into a reset.
"""

from __future__ import annotations

import collections
import math
import socket
from typing import Any, Final, Protocol

import httptools

from broker.http.server import HttpLimits
from broker.observe.log import events
from broker.proxy.reactor import BROKEN, IN, NONE, OUT, Reactor

log = events("broker.http")

READ_SIZE: Final = 65536
#: How long a refused peer's leftover input is read and dropped before closing.
LINGER: Final = 2.0
LINGER_BYTES: Final = 4 * 1024 * 1024
#: Unsent answer bytes past which the upstream is asked to stop reading.
HIGH_WATER: Final = 256 * 1024


class Request:
    """A request as parsed: bytes throughout, header names lowercased, in order."""

    __slots__ = (
        "answered",
        "complete",
        "ended",
        "fields",
        "head_size",
        "headed",
        "headers",
        "keep_alive",
        "method",
        "parts",
        "received",
        "target",
        "version",
    )

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        #: Each header's last value by name, made once the head is whole.
        self.fields: dict[bytes, bytes] = {}
        self.keep_alive = True
        #: Body pieces parsed and not yet handed on.
        self.parts: list[bytes] = []
        self.received = 0
        self.head_size = 0
        self.headed = False
        self.complete = False
        #: Whether the handler heard the body's end.
        self.ended = False
        #: Whether its answer is out (the rest of its body is read and dropped).
        self.answered = False


class Handling(Protocol):
    """The proxy's side of one request (handler.py)."""

    def on_body(self, data: bytes) -> None: ...

    def on_body_end(self) -> None: ...

    def on_writable(self) -> None:
        """The answer's backlog went out: more may be written."""

    def on_gone(self, status: int) -> None:
        """The caller left (499), or broke HTTP (the refusal's `status`), before the
        answer ended."""


class App(Protocol):
    def begin(self, conn: ClientConnection, request: Request) -> Handling: ...

    def refused(self, status: int, code: str, message: str) -> tuple[list[tuple[str, str]], bytes]:
        """The body of a refusal (the proxy's GraphQL-shaped error)."""


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; `ClientConnection._refusal` says why."""


class ClientConnection:
    """One caller's connection on the proxy's reactor: its parser, what it has sent and
    not yet been answered, what is queued back to it, and its limits' clocks.

    Over the house's ~300 lines and ~15 attributes, on purpose: it is the caller's side
    of HTTP/1.1 as one state machine driven by epoll events and httptools callbacks, on
    the hot path of every proxied request; its fields are slots read on each event, and
    splitting it would add a call and a lookup per callback for no separate concern
    (the request itself is `handler.Proxied`, the origin `upstream.UpstreamConnection`).
    """

    __slots__ = (
        "_advancing",
        "_again",
        "_blocked",
        "_handling",
        "_head",
        "_head_bytes",
        "_in_head",
        "_lingering",
        "_max_head",
        "_parsing",
        "_paused",
        "_peer_done",
        "_queue",
        "_refusal",
        "_want",
        "app",
        "closed",
        "deadline",
        "dropped",
        "fd",
        "last_active",
        "limits",
        "listener",
        "on_close",
        "out",
        "parser",
        "peer",
        "reactor",
        "sock",
        "stage_since",
        "started",
    )

    def __init__(
        self,
        reactor: Reactor,
        sock: socket.socket,
        peer: Any,
        app: App,
        *,
        limits: HttpLimits,
        listener: str,
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.app = app
        self.limits = limits
        self._max_head = limits.max_header_size
        self.listener = listener
        self.parser = httptools.HttpRequestParser(self)
        self.out = bytearray()
        self.closed = False
        #: Called once when the connection ends (the admission's count).
        self.on_close: list[Any] = []
        self._queue: collections.deque[Request] = collections.deque()
        self._parsing: Request | None = None
        self._handling: Handling | None = None
        self._refusal: tuple[int, str, str] | None = None
        self._in_head = False
        #: Whether the current answer's head is out (or queued in `out`).
        self.started = False
        self._blocked = False
        #: An answer's head not sent yet (it goes with the first piece of body).
        self._head = b""
        #: Whether the proxy paused reading (a streamed body the upstream is not taking).
        self._paused = False
        #: The caller shut its side after a whole request: answered, then closed.
        self._peer_done = False
        self._advancing = False
        self._again = False
        #: Bytes read while a head was unfinished (bounds one that never ends).
        self._head_bytes = 0
        self._lingering = False
        self.dropped = 0
        now = reactor.tick()
        self.last_active = now
        #: When the head began, or the last body read, or writing blocked.
        self.stage_since = now
        self.deadline = now + limits.idle_timeout
        self._want = IN
        reactor.register(self.fd, self, IN)
        reactor.track(self)

    # -- reading ---------------------------------------------------------------------------

    def on_event(self, events: int) -> None:
        if events & OUT:
            self._flush()
            if self.closed:
                return
        if events & BROKEN and not self._want & IN:
            self._gone()  # reset, or closed both ways, while we were not reading
            return
        if events & ~OUT and self._want & IN:
            if self._lingering:
                self._drop_input()
            else:
                self._read()

    def _read(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if self._handling is not None and self._queue and self._queue[0].complete:
                # Shut for writing after a whole request (a half-close): it still gets
                # its answer, and nothing more is read.
                self._peer_done = True
                self._set_reading()
                return
            self._gone()
            return
        now = self.reactor.now
        self.last_active = now
        was_in_head = self._in_head
        if not was_in_head:
            self.stage_since = now  # a head begins, or more body: its clock restarts
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            pass  # _Stop: the refusal is set
        except httptools.HttpParserUpgrade:
            self._refusal = self._refusal or (400, "bad_request", "bad request: no upgrades")
        except httptools.HttpParserError as exc:
            self._refusal = self._refusal or (400, "bad_request", f"bad request: {exc}")
        if self._refusal is None and self._in_head:
            # An unfinished head is measured by the reads it spans (the parser's
            # callbacks see only whole header lines).
            self._head_bytes += len(data) if was_in_head else 0
            if self._head_bytes > self.limits.max_header_size:
                self._refusal = (431, "headers_too_large", "request head too large")
        if self._refusal is not None:
            self.refuse(*self._refusal)
            return
        self._advance()

    def on_message_begin(self) -> None:
        request = self._parsing = Request()
        self._queue.append(request)
        self._in_head = True
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.target += url
        request.head_size += len(url)
        if request.head_size > self._max_head:
            self._head_too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for each header of every request: kept to a few operations.
        request = self._parsing
        assert request is not None
        if request.headed:
            return  # a trailer: not forwarded
        request.headers.append((name.lower(), value))
        request.head_size += len(name) + len(value) + 4
        if request.head_size > self._max_head:
            self._head_too_large()

    def _head_too_large(self) -> None:
        self._refusal = (431, "headers_too_large", "request head too large")
        raise _Stop

    def on_headers_complete(self) -> None:
        request = self._parsing
        assert request is not None
        parser = self.parser
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        request.headed = True
        self._in_head = False
        self.stage_since = self.reactor.now
        request.fields = dict(request.headers)
        declared = request.fields.get(b"content-length")
        if (
            declared is not None
            and declared.isdigit()
            and int(declared) > self.limits.max_body_size
        ):
            self._refusal = (
                413,
                "request_too_large",
                f"body over {self.limits.max_body_size} bytes",
            )
            raise _Stop

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        assert request is not None
        request.received += len(body)
        if request.received > self.limits.max_body_size:
            self._refusal = (
                413,
                "request_too_large",
                f"body over {self.limits.max_body_size} bytes",
            )
            raise _Stop
        request.parts.append(body)

    def on_message_complete(self) -> None:
        request = self._parsing
        assert request is not None
        request.complete = True
        self._parsing = None

    # -- the proxy's turn ------------------------------------------------------------------

    def _advance(self) -> None:
        """Hand the first request (and its body so far) to the proxy; move past
        requests whose answers are out and whose bodies are read. Not re-entered: an
        answer given while the proxy is being told (a refusal) loops here instead."""
        if self._advancing:
            self._again = True
            return
        self._advancing = True
        try:
            self._again = True
            while self._again and not self.closed:
                self._again = False
                self._step()
        finally:
            self._advancing = False
        self._set_reading()

    def _step(self) -> None:
        queue = self._queue
        while queue and not self.closed:
            request = queue[0]
            if not request.headed:
                return
            if request.answered:
                request.parts.clear()  # the rest of an early-answered body: dropped
                if not request.complete:
                    return
                queue.popleft()
                continue
            if self._handling is None:
                self.started = False
                handling = self.app.begin(self, request)
                if _settled(request, self):
                    continue  # answered at once
                self._handling = handling
            handling = self._handling
            if request.parts:
                parts, request.parts = request.parts, []
                for part in parts:
                    handling.on_body(part)
                    if _settled(request, self):
                        break
            if request.complete and not request.ended and not request.answered:
                request.ended = True
                handling.on_body_end()
            return

    def _set_reading(self) -> None:
        """Read while no request waits for its answer, or the current one's body is
        still coming (unless the proxy paused it)."""
        if self.closed or self._lingering:
            return
        queue = self._queue
        if self._peer_done:
            read = False
        elif self._handling is None:
            read = True  # between requests, or dropping an answered body
        else:
            # Reading on while the answer is awaited costs nothing when the caller
            # waits (as nearly all do) and spares two epoll_ctl calls per request;
            # a pipelined request stops it (at most one read's worth is held).
            read = len(queue) == 1 and not self._paused
        mask = (IN if read else NONE) | (OUT if self.out else NONE)
        if mask != self._want:
            self._set_interest(mask)
        self._update_deadline()

    def pause_reading(self, paused: bool) -> None:
        """The upstream is not taking a streamed body as fast as it comes."""
        self._paused = paused
        if not self._advancing:
            self._set_reading()

    def _set_interest(self, mask: int) -> None:
        if mask != self._want and not self.closed:
            self._want = mask
            self.reactor.modify(self.fd, mask)

    # -- the answer ------------------------------------------------------------------------

    def answer(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        *,
        close: bool = False,
        head_only: bool = False,
    ) -> None:
        """A whole answer (the proxy's own: errors, /metrics); its head is str."""
        lines = [f"{k}: {v}\r\n" for k, v in headers]
        lines.append(f"content-length: {len(body)}\r\n")
        request = self._queue[0] if self._queue else None
        close = close or request is None or not request.keep_alive
        if close:
            lines.append("connection: close\r\n")
        head = status_line(status) + "".join(lines).encode("latin-1") + b"\r\n"
        self.started = True
        self.write(head if head_only else head + body)
        self.end(keep_alive=not close)

    def start(self, head: bytes) -> None:
        """The answer's head: it goes out with the first `write` (or `end`), one send
        for an answer whose body is at hand, not two."""
        self.started = True
        self._head = head

    def write(self, data: bytes) -> bool:
        """Send what the socket takes, keep the rest; False past `HIGH_WATER` unsent
        (the caller waits for `on_writable`)."""
        if self.closed:
            return False
        if self._head:
            data, self._head = self._head + data, b""
        if self.out:
            self.out += data
        else:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._gone()
                return False
            if sent < len(data):
                self.out += memoryview(data)[sent:]
                self.stage_since = self.reactor.now
                self._set_interest(self._want | OUT)
                self._update_deadline()
        if len(self.out) > HIGH_WATER:
            self._blocked = True
            return False
        return True

    def end(self, *, keep_alive: bool) -> None:
        """The answer is complete; the connection carries on if `keep_alive` (and the
        caller asked for it)."""
        if self.closed:
            return
        if self._head and not self.write(b"") and _closed(self):
            return
        self._handling = None
        self._paused = False
        request = self._queue[0] if self._queue else None
        if request is None or not keep_alive or not request.keep_alive or self._peer_done:
            self._finish()
            return
        self.started = False
        request.answered = True
        self.last_active = self.reactor.now
        if request.complete and len(self._queue) == 1 and not self._advancing:
            # The usual end (nothing sent behind it, all of it read): what `_advance`
            # would do, without its loop.
            self._queue.popleft()
            self._set_reading()
            return
        self._advance()

    def hang_up(self) -> None:
        """The answer cannot be finished (its head is out): close without more."""
        self._handling = None
        self._head = b""
        self._close()

    def _flush(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self._gone()
            return
        del self.out[:sent]
        now = self.reactor.now
        self.stage_since = self.last_active = now
        if self.out:
            self._update_deadline()
            return
        self._set_interest(self._want & ~OUT)
        if self._lingering:
            self._shut()
            return
        if self._blocked:
            self._blocked = False
            if self._handling is not None:
                self._handling.on_writable()
        self._update_deadline()

    # -- refusals and the end --------------------------------------------------------------

    def refuse(self, status: int, code: str, message: str) -> None:
        """A request the shell cannot serve: answered (if no answer began), then closed
        cleanly. One log line."""
        log.info("request_refused", listener=self.listener, status=status, code=code)
        handling, self._handling = self._handling, None
        if handling is not None:
            handling.on_gone(status)
        if self.started or self.closed:
            self._close()
            return
        headers, body = self.app.refused(status, code, message)
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
        head = status_line(status) + lines.encode("latin-1")
        self.started = True
        self.write(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        self._finish()

    def refuse_at_door(self, data: bytes, linger: float) -> None:
        """A connection turned away before a request: `data` (the answer) and a short
        linger (or none, in a flood)."""
        self.write(data)
        if linger <= 0:
            self._close()
            return
        self._finish(linger)

    def _finish(self, linger: float = LINGER) -> None:
        """No more answers: once `out` is sent, shut our side and linger."""
        self._handling = None
        self._lingering = True
        self._queue.clear()
        self.stage_since = self.reactor.now
        self.deadline = self.stage_since + linger
        self.reactor.watch(self.deadline)
        if not self.out:
            self._shut()
        else:
            self._set_interest(IN | OUT)

    def _shut(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        self._set_interest(IN)

    def _drop_input(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.dropped += len(data)
        if not data or self.dropped > LINGER_BYTES:
            self._close()

    def _gone(self) -> None:
        """The peer closed (or reset) its side."""
        handling, self._handling = self._handling, None
        if handling is not None:
            handling.on_gone(499)
        self._close()

    def expire(self, now: float) -> None:
        if self._lingering or self.out:
            self._gone()  # lingered enough, or it stopped reading our answer
            return
        if self._in_head:
            self.refuse(408, "request_timeout", "the request head took too long")
        elif self._queue and not self._queue[-1].complete and self._queue[-1].headed:
            self.refuse(408, "request_timeout", "the body stopped arriving")
        elif not self._queue and self._handling is None:
            self._close()  # idle between requests
        else:
            self.deadline = math.inf

    def _update_deadline(self) -> None:
        limits = self.limits
        if self._lingering:
            return
        if self.out:
            deadline = self.stage_since + limits.idle_timeout
        elif self._in_head:
            deadline = self.stage_since + limits.header_timeout
        elif self._queue and self._queue[-1].headed and not self._queue[-1].complete:
            deadline = self.stage_since + limits.idle_timeout
        elif self._queue or self._handling is not None:
            deadline = math.inf  # waiting for the upstream, which has its own timeout
        else:
            deadline = self.last_active + limits.idle_timeout
        self.deadline = deadline
        self.reactor.watch(deadline)

    def abort(self) -> None:
        self._gone()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._queue.clear()
        self.reactor.untrack(self)
        self.reactor.unregister(self.fd)
        self.sock.close()
        for callback in self.on_close:
            callback()


def _closed(conn: ClientConnection) -> bool:
    return conn.closed


def _settled(request: Request, conn: ClientConnection) -> bool:
    """Whether telling the proxy something ended the request (answered it at once) or
    the connection (a function, so the type checker does not assume it cannot)."""
    return request.answered or conn.closed


def status_line(status: int) -> bytes:
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status


def _status_lines() -> dict[int, bytes]:
    import http

    return {
        s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("ascii"))
        for s in http.HTTPStatus
    }


_STATUS_LINES: Final = _status_lines()
