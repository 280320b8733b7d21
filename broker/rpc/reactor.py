"""The Unix-socket server's reactor: connections, framing, flow control, timeouts.

The hot path is `token` answered from memory, tens of thousands of times a second.
Everything that may wait (a refresh a token needs, a login, a watch) runs as a task
(`dispatch`) and writes its answer through the same connection object when done, so a
slow request never holds up the ones behind it. A connection's failure (or a bug while
serving it) closes that connection, never the server.

Around the reactor: `peercred` says who the peer is, `admission` whether it may connect
and how much it may leave unread, `dispatch` what each request gets. Limits here: frames
of at most 64 KiB; past `admission`'s bounds the connection gets a `busy` frame (at
accept) or is closed and counted (unread answers); `max_requests_per_connection` waiting
ops per connection; at most `_MAX_JOIN` bytes of answers joined into one write; idle
connections, half-sent frames and unread answers time out, checked by a housekeeping
task that sleeps until the earliest deadline.

Some facts about the private epoll
==================================

Why not a trio task per connection: each request would then cost a scheduler round
trip and an epoll_ctl in trio's own epoll (trio arms an fd with EPOLLONESHOT for
each wait), which profiling showed to be most of the cost of a `token`
answer (19k req/s against 75k with the reactor; benchmarks/README.md has the history).
So one task, the reactor, owns every connection through an epoll instance of its own,
and trio waits on that epoll's fd as one readable file descriptor
(`trio.lowlevel.wait_readable`): an epoll fd is readable while any fd in its set is
ready.

Who owns which fd: the listening socket belongs to the daemon (listener.py); the server
only registers it while it accepts (`_accepting`), and unregisters it to pause (fd
exhaustion) or to stop. Every accepted socket belongs to its `Connection`; `_close` is
the one place that unregisters it, closes it and cancels the connection's waiting
tasks, and it runs at most once per connection (`closed`). Nothing else registers fds
in this epoll, and trio never sees them, so no fd is ever in two epoll sets.

Level-triggered without EPOLLONESHOT is safe here because only the reactor ever reads
or writes a connection's socket from a ready event, on trio's single thread, and each
event is handled to the point where the fd is no longer ready or its interest is
changed: a read takes what one recv returns and answers it (a frame left in the kernel
buffer simply wakes us again next round, which is the fairness we want); a writable
connection flushes, and its interest goes back to EPOLLIN only when its backlog is
gone. Tasks that answer later (`write`) send directly and switch the fd to EPOLLOUT
when the socket is full; they run between reactor rounds, never during one.
Edge-triggered mode would make every handler drain its socket to EAGAIN, which lets
one greedy client starve the rest of a wake-up.

Why the reactor polls until a poll comes back empty before it waits again: a
level-triggered epoll keeps a served fd on its ready list until its next poll finds
it no longer ready, and while anything is on that list the epoll's own fd reads as
readable. Waiting right after a batch would have trio wake the reactor at once for
nothing: measured at one connection, that spurious round trip through trio's
scheduler nearly tripled the CPU time per request (7.9 to 19.7 us). One empty
`poll(0)` costs far less.

Fairness within one wake-up: one wake-up serves up to `_BATCHES_PER_WAKEUP` (8) polls
of up to `_MAX_EVENTS` (1024) ready fds without a checkpoint, so up to 8 x 1024
connections are served before other tasks run. That bound is deliberate: nothing on
that path awaits or blocks (each connection gets one recv and at most `_BATCH` (64)
answers per round), so the longest gap is a few milliseconds at full load, and the
tasks that wait (refreshes, watches) are not latency-critical at that scale.

The C hot path: where `_fastpath.c` is built (fastpath.py), each poll is its `poll`,
which reads from every ready quiet connection, answers a lone whole `token` or
`session_token` request as `dispatch` would, and hands back everything else with what it
read (`_serve_left`). It runs inside this task, on trio's thread, like the rest of a
round: the invariants above hold for it too (it touches only quiet connections' sockets,
never their interest; a half-sent answer's tail is queued here before anything else is
served).

Linux only: epoll is a Linux interface, and the daemon is a Linux service (systemd
units).
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
from typing import TYPE_CHECKING, Final

import trio

from broker.core.errors import BadFrame, Busy
from broker.core.stats import ServerStats
from broker.observe.log import events
from broker.rpc import fastpath
from broker.rpc.admission import Admission, Limits
from broker.rpc.connection import INF, Connection
from broker.rpc.dispatch import Dispatcher, error_frame
from broker.rpc.peercred import peer_of
from geins_broker_client.protocol import DEFAULT_PROFILE, RECV_SIZE, Code

if TYPE_CHECKING:
    from broker.core.clock import WallClock
    from broker.daemon.config import BrokerConfig
    from broker.rpc.ops import Api
    from geins_broker_client.protocol import Message

log = events("broker.server")

#: accept() errors that mean "out of resources", not "that client is gone": the
#: listener stays readable, so accepting pauses instead of spinning (trio's
#: ACCEPT_CAPACITY_ERRNOS names the same four).
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_MAX_EVENTS: Final = 1024
_BATCHES_PER_WAKEUP: Final = 8
#: How long to stop accepting when the process has run out of file descriptors.
_ACCEPT_PAUSE: Final = 0.5
#: Requests answered per write; the rest of a pipelined read waits for the client.
_BATCH: Final = 64
#: At most this many bytes of answers are joined into one write (a batch of big answers
#: is written in parts, and what the client is not reading yet stays unanswered).
_MAX_JOIN: Final = 256 * 1024
_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT


class Server:
    """The reactor: owns the epoll, every connection's socket and its timeouts.

    Who may connect is `admission`'s to say and what a request gets `requests`' (a
    `Dispatcher`); this class moves bytes. It stays one class of about 330 lines
    because its methods share one invariant, stated in the module's design note: only
    the reactor touches a connection's socket and its epoll interest, and `_close` is
    the one way out; splitting reading from writing would spread that invariant over
    two classes that call each other on every request.
    """

    def __init__(
        self,
        api: Api,
        config: BrokerConfig,
        wall: WallClock,
        stats: ServerStats | None = None,
    ) -> None:
        self.api = api
        self.stats = stats or ServerStats()
        self.admission = Admission(api, Limits.of(config))
        self.requests = Dispatcher(api, self.admission, wall, self.stats)
        self._dispatch = self.requests.dispatch
        self._connections: dict[int, Connection] = {}
        self._epoll = select.epoll()
        self._listener: socket.socket | None = None
        #: Whether the listener is registered in the epoll now (not while paused).
        self._accepting = False
        self._nursery: trio.Nursery | None = None
        self._wake_housekeeper = trio.Event()
        self._next_check = INF
        self._wall_now = wall.now
        #: The token hot path in C (fastpath.py), or None to serve everything here.
        self._fast = fastpath.make(
            self._epoll.fileno(), self._connections, api.profiles, DEFAULT_PROFILE, api.session_ops
        )

    @property
    def accelerated(self) -> bool:
        """Whether the C hot path serves `token` and `session_token` (fastpath.py)."""
        return self._fast is not None

    @property
    def fast_answers(self) -> int:
        """Requests the C hot path answered (each also counted where Python counts it)."""
        return 0 if self._fast is None else self._fast.answered

    def configure(self, config: BrokerConfig) -> None:
        """Limits and timeouts, at start and again at every reload."""
        self.admission.configure(Limits.of(config))
        self._wake_housekeeper.set()

    @property
    def limits(self) -> Limits:
        return self.admission.limits

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def in_flight(self) -> int:
        """Waiting ops in flight, watches excluded: what a shutdown waits for."""
        return self.requests.in_flight

    @property
    def waiting_by_op(self) -> dict[str, int]:
        """Waiting ops in flight by op (watches included), for the metrics."""
        return self.requests.waiting_by_op

    # -- running -----------------------------------------------------------------------

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; `task_status.started()` once connections are accepted."""
        listener.setblocking(False)
        self._listener = listener
        self._epoll.register(listener.fileno(), _IN)
        self._accepting = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.requests.start(self, nursery)
                nursery.start_soon(self._housekeeping)
                if self._fast is not None:
                    log.info("token_hot_path", runs_in="C")
                else:
                    log.info("token_hot_path", runs_in="Python", why=fastpath.unavailable())
                task_status.started()
                await self._reactor()
        finally:
            for conn in list(self._connections.values()):
                self._close(conn)
            self._epoll.close()

    def stop_accepting(self) -> None:
        """Accept no more connections; safe at any moment, a pause included."""
        listener, self._listener = self._listener, None
        if listener is not None and self._accepting:
            self._epoll.unregister(listener.fileno())
        self._accepting = False

    async def drained(self) -> None:
        """Return once no waiting op (other than watches) is in flight."""
        await self.requests.drained()

    async def _reactor(self) -> None:
        epoll = self._epoll
        fast = self._fast
        wall_now = self._wall_now
        while True:
            await trio.lowlevel.wait_readable(epoll)
            # Under load, requests keep arriving while a batch is served: take a few
            # more batches straight from epoll before handing control back to trio.
            # The last, empty poll is needed even when a batch was one connection:
            # it is what clears this epoll's ready list (see the design note).
            for _ in range(_BATCHES_PER_WAKEUP):
                if fast is not None:
                    now = trio.current_time()
                    left = fast.poll(wall_now(), now)
                    if left is None:
                        break
                    if left:
                        self._serve_left(left, now)
                    continue
                ready = epoll.poll(0, _MAX_EVENTS)
                if not ready:
                    break
                self._serve_ready(ready, trio.current_time())

    def _serve_left(
        self, left: list[tuple[int, int, bytes | None, bytes | None]], now: float
    ) -> None:
        """What the C hot path handed back, served here as `_serve_ready` would: the
        rest of each answer it could not finish sending (`unsent`) is queued first, so
        nothing served after it can write to that connection ahead of it; then what it
        read and did not answer (`data`), and the events it did not touch."""
        connections = self._connections
        for fd, _, _, unsent in left:
            if unsent is not None and (conn := connections.get(fd)) is not None:
                self._keep(conn, unsent)
        for fd, mask, data, unsent in left:
            if unsent is not None:
                continue
            conn = connections.get(fd)
            if conn is None or data is None:
                self._serve_ready([(fd, mask)], now)
                continue
            try:
                self._received(conn, data, now)
            except Exception:
                log.exception("connection_failed", peer_uid=conn.peer.uid)
                self._close(conn)

    def _serve_ready(self, ready: list[tuple[int, int]], now: float) -> None:
        for fd, mask in ready:
            conn = self._connections.get(fd)
            if conn is None:
                if self._listener is not None and fd == self._listener.fileno():
                    try:
                        self._accept(self._listener, now)
                    except Exception:
                        # Like a connection's failure: a bug while accepting costs a
                        # pause in accepting, never the reactor (nor a busy loop).
                        log.exception("accept_failed")
                        self._pause_accepting(self._listener)
                continue
            try:
                if mask & _OUT:
                    self._flush(conn, now)
                elif not conn.closed:
                    self._read(conn, now)
            except Exception:
                # A bug while serving one connection ends that connection only.
                log.exception("connection_failed", peer_uid=conn.peer.uid)
                self._close(conn)

    # -- connections ---------------------------------------------------------------------

    def _accept(self, listener: socket.socket, now: float) -> None:
        admission = self.admission
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                    # The listener stays readable: stop watching it for a moment rather
                    # than spin, and let connections close meanwhile.
                    self.stats.refused.inc("out_of_resources")
                    log.error("accept_paused", reason=exc.strerror, seconds=_ACCEPT_PAUSE)
                    self._pause_accepting(listener)
                    return
                log.warning("accept_failed", reason=exc.strerror)  # that client is gone
                continue
            sock.setblocking(False)
            try:
                peer = peer_of(sock)
            except OSError:  # gone before we could look at it
                sock.close()
                continue
            refusal = admission.refusal(peer, len(self._connections))
            if refusal is not None:
                self.stats.refused.inc(refusal)
                self.stats.errors.inc(Code.BUSY)
                _refuse(sock)
                continue
            conn = Connection(sock, peer, now, stranger=admission.is_stranger(peer))
            self._connections[conn.fd] = conn
            self.stats.accepted += 1
            admission.opened(peer.uid)
            self._epoll.register(conn.fd, _IN)
            self.check_timeouts_by(now + admission.idle_limit(conn.stranger))

    def _pause_accepting(self, listener: socket.socket) -> None:
        if self._accepting:
            self._epoll.unregister(listener.fileno())
            self._accepting = False
            assert self._nursery is not None
            self._nursery.start_soon(self._resume_accepting, listener)

    async def _resume_accepting(self, listener: socket.socket) -> None:
        await trio.sleep(_ACCEPT_PAUSE)
        if self._listener is listener and not self._accepting:
            self._epoll.register(listener.fileno(), _IN)
            self._accepting = True

    def _read(self, conn: Connection, now: float) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._received(conn, data, now)

    def _received(self, conn: Connection, data: bytes, now: float) -> None:
        """Serve one read's bytes (b"": the peer is gone)."""
        if not data:
            self._close(conn)
            return
        conn.last_active = now
        if conn.held is None and (message := conn.decoder.one(data)) is not None:
            # The usual case: the read is exactly one whole request, with nothing
            # buffered before it, so nothing is left half-received after it.
            answer = self._dispatch(conn, message)
            if answer is not None:
                self.write(conn, answer)
            conn.partial_since = INF
            return
        self._answer(conn, data)
        if conn.closed or not conn.decoder.buffered or conn.decoder.complete:
            conn.partial_since = INF
        elif conn.partial_since == INF:
            # The clock starts with the first byte of a frame, not the latest one: a
            # byte every few seconds must not keep a half frame alive for ever.
            conn.partial_since = now
            self.check_timeouts_by(now + self.admission.limits.frame_timeout)

    def _answer(self, conn: Connection, data: bytes = b"") -> None:
        """Answer the requests received, a batch at a time, while the client takes the
        answers. One read can hold thousands of pipelined requests, whose answers are
        fifty times their size: those the client is not reading yet stay undecoded, or,
        once a batch's answers outgrow one write, decoded but unanswered (`held`)."""
        decoder = conn.decoder
        dispatch = self.requests.dispatch
        while True:
            if conn.held is not None:
                messages, conn.held = conn.held, None
                if data:
                    decoder.feed(data, 0)  # buffer it, undecoded, behind the held ones
            else:
                messages = decoder.feed(data, _BATCH)
            data = b""
            if len(messages) == 1:  # one request per read: the usual case
                answer = dispatch(conn, messages[0])
                answers = [answer] if answer is not None else []
            else:
                answers = self._answer_batch(conn, messages)
                if conn.closed:
                    return
            if decoder.error is not None and conn.held is None:
                answers.append(self.requests.error_frame(None, BadFrame(str(decoder.error))))
                conn.closing = True
            if answers:
                self.write(conn, answers[0] if len(answers) == 1 else b"".join(answers))
            if conn.closed or conn.out or not (conn.held or decoder.complete):
                break  # done, or waiting for the client to read (flush resumes here)
        if conn.closing and not conn.out:
            self._close(conn)

    def _answer_batch(self, conn: Connection, messages: list[Message]) -> list[bytes]:
        """The answers to a batch, writing every `_MAX_JOIN` bytes of them; what is
        left when the client stops taking them is held. Returns the unwritten answers."""
        dispatch = self.requests.dispatch
        answers: list[bytes] = []
        size = 0
        for i, message in enumerate(messages):
            answer = dispatch(conn, message)
            if answer is None:
                continue
            answers.append(answer)
            size += len(answer)
            if size >= _MAX_JOIN and i + 1 < len(messages):
                self.write(conn, b"".join(answers))
                answers, size = [], 0
                if conn.closed:
                    break
                if conn.out:
                    conn.held = messages[i + 1 :]
                    break
        return answers

    def write(self, conn: Connection, data: bytes) -> None:
        """Send at once what the socket takes; keep the rest, stop reading meanwhile.

        What a client leaves unread is bounded (`admission`): past `max_unread` bytes
        on its connection (beyond one answer, which may be larger), or past
        `max_unread_total` across all of them, the connection is closed and counted.
        Nothing else waits for it, so others are never slowed."""
        if conn.closed:
            return
        if conn.out:
            if not self.admission.fits_connection(len(conn.out), len(data)) or not self._room(
                conn, len(data)
            ):
                self._overflow(conn, len(data))
                return
            conn.out += data
            self.admission.unread += len(data)
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            self._keep(conn, data[sent:])

    def _keep(self, conn: Connection, rest: bytes) -> None:
        """Queue what the socket would not take, and wait for the client to read."""
        if not self._room(conn, len(rest)):
            self._overflow(conn, len(rest))
            return
        conn.out += rest
        self.admission.unread += len(rest)
        conn.blocked_since = trio.current_time()
        self._epoll.modify(conn.fd, _OUT)
        self.check_timeouts_by(conn.blocked_since + self.admission.limits.send_timeout)

    def _room(self, conn: Connection, adding: int) -> bool:
        """Whether `adding` unread bytes fit in the total, after closing the connections
        that hold the most unread (the hogs, not whoever happens to write next: a slow
        reader must not pay for a connection that never reads). False when `conn`
        itself holds the most. Rare, so a scan of the connections is fine."""
        while self.admission.over_total(adding):
            hog = max(self._connections.values(), key=lambda c: len(c.out))
            if hog is conn or len(hog.out) <= len(conn.out):
                return False
            self._overflow(hog, 0)
        return True

    def _overflow(self, conn: Connection, adding: int) -> None:
        admission = self.admission
        admission.overflows += 1
        log.warning(
            "connection_overflow",
            peer_uid=conn.peer.uid,
            unread=len(conn.out),
            adding=adding,
            unread_total=admission.unread,
            closed_total=admission.overflows,
        )
        self._close(conn)

    def _flush(self, conn: Connection, now: float) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        del conn.out[:sent]
        self.admission.unread -= sent
        if conn.out:
            return
        conn.blocked_since = INF
        conn.last_active = now
        if conn.closing:
            self._close(conn)
            return
        self._epoll.modify(conn.fd, _IN)
        self._answer(conn)  # requests held back while the client was not reading

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        conn.held = None
        self.admission.closed(conn.peer.uid)
        if conn.out:
            self.admission.unread -= len(conn.out)
            conn.out = bytearray()
        del self._connections[conn.fd]
        self._epoll.unregister(conn.fd)
        conn.sock.close()
        for scope in conn.tasks:
            scope.cancel()

    # -- timeouts ------------------------------------------------------------------------

    def _deadline(self, conn: Connection) -> float:
        limits = self.admission.limits
        if conn.out:
            return conn.blocked_since + limits.send_timeout
        if conn.partial_since != INF:
            return conn.partial_since + limits.frame_timeout
        if conn.waiting:
            return INF
        return conn.last_active + self.admission.idle_limit(conn.stranger)

    def check_timeouts_by(self, when: float) -> None:
        """Have the housekeeper look again by `when` (a new deadline may be earlier)."""
        if when < self._next_check:
            self._wake_housekeeper.set()

    async def _housekeeping(self) -> None:
        """Close connections past their deadline; sleep until the next one is due."""
        while True:
            now = trio.current_time()
            self._next_check = INF
            for conn in list(self._connections.values()):
                deadline = self._deadline(conn)
                if deadline <= now:
                    log.info("connection_timed_out", peer_uid=conn.peer.uid, waiting=len(conn.out))
                    self._close(conn)
                else:
                    self._next_check = min(self._next_check, deadline)
            self._wake_housekeeper = trio.Event()
            with trio.move_on_at(self._next_check):
                await self._wake_housekeeper.wait()


def _refuse(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.send(error_frame(None, Busy("too many connections; try again shortly")))
    sock.close()
