"""The Unix-socket server: connections, peer credentials, framing, dispatch.

The hot path is `token` answered from memory, tens of thousands of times a second.
Everything that may wait (a refresh a token needs, a login, a watch) runs as a task in
the server's nursery and writes its answer through the same connection object when
done, so a slow request never holds up the ones behind it. A connection's failure (or a
bug while serving it) closes that connection, never the server.

Limits: frames of at most 64 KiB; `max_connections` (a further connection gets a
`busy` frame and is closed), of which the last `admin_reserved_connections` are for root
and the daemon's user, and at most `max_connections_per_uid` for any other uid; a
peer that may read no profile is closed after `stranger_idle_timeout` idle;
`max_requests_per_connection` waiting ops per connection;
unread answers of at most `max_unread_bytes` per connection (beyond one answer) and
`max_unread_total` in all (past either, the connection is closed and counted); at most
`_MAX_JOIN` bytes of answers joined into one write; idle connections, half-sent frames
and unread answers time out, checked by a housekeeping task that sleeps until the
earliest deadline.

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

Fairness within one wake-up: one wake-up serves up to `_BATCHES_PER_WAKEUP` (8) polls
of up to `_MAX_EVENTS` (1024) ready fds without a checkpoint, so up to 8 x 1024
connections are served before other tasks run. That bound is deliberate: nothing on
that path awaits or blocks (each connection gets one recv and at most `_BATCH` (64)
answers per round), so the longest gap is a few milliseconds at full load, and the
tasks that wait (refreshes, watches) are not latency-critical at that scale.

Linux only: epoll, SO_PEERCRED and SO_PEERGROUPS are Linux interfaces, and the daemon
is a Linux service (systemd units).
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

import trio

from broker.core.clock import WallClock
from broker.core.errors import (
    BadFrame,
    BadRequest,
    BrokerFault,
    Busy,
    Forbidden,
    Internal,
    UnknownOp,
)
from broker.core.stats import ServerStats
from broker.daemon.config import BrokerConfig
from broker.observe.log import events
from broker.policy.schemas import SCHEMAS, arguments
from broker.rpc.ops import Api, Peer
from geins_broker_client.protocol import (
    DEFAULT_PROFILE,
    MAX_REQUEST_SIZE,
    RECV_SIZE,
    Code,
    FrameDecoder,
    Op,
    encode,
    error_body,
)

if TYPE_CHECKING:
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
_CREDENTIALS: Final = struct.Struct("3i")
#: Linux's SO_PEERGROUPS (4.13+); the stdlib does not name it.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
#: The most CPython's getsockopt reads: 256 gids.
_GROUPS_BUFFER: Final = 1024
_IN: Final = select.EPOLLIN
_OUT: Final = select.EPOLLOUT
_INF: Final = float("inf")
_TOKEN: Final = Op.TOKEN
_NUMBERS: Final = (int, float)


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    )
    return Peer(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """The peer's supplementary groups, as the kernel recorded them at connect().

    CPython's getsockopt takes at most 1024 bytes, room for 256 groups; a peer in more
    gets ERANGE, a kernel before 4.13 ENOPROTOOPT. Then /proc/PID/status says, which is
    the process's groups now rather than at connect() (and a PID may be reused), so the
    fallback is logged: `allow_groups` must never quietly shrink to the primary group.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GROUPS_BUFFER)
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, str(exc))
        if exc.errno == errno.ERANGE:
            log.info("peer_groups_from_proc", pid=pid, reason="over_256_groups")
        else:
            log.warning("peer_groups_from_proc", pid=pid, reason=reason)
        return _groups_from_proc(pid)
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


def _groups_from_proc(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(gid) for gid in line.split()[1:])
        problem = "no Groups line"
    except (OSError, ValueError) as exc:
        problem = getattr(exc, "strerror", None) or type(exc).__name__
    log.warning("peer_groups_unknown", pid=pid, reason=problem)
    return frozenset()


def error_frame(request_id: int | None, exc: BrokerFault) -> bytes:
    return encode({"id": request_id, **error_body(exc.code, str(exc))})


class Connection:
    """One client: its socket, what it has half-sent, what it has not read yet."""

    __slots__ = (
        "acl_cache",
        "blocked_since",
        "closed",
        "closing",
        "decoder",
        "fd",
        "held",
        "last_active",
        "out",
        "partial_since",
        "peer",
        "sock",
        "stranger",
        "tasks",
        "waiting",
    )

    def __init__(
        self, sock: socket.socket, peer: Peer, now: float, *, stranger: bool = False
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        #: The peer may read no profile: it gets the short idle timeout.
        self.stranger = stranger
        self.decoder = FrameDecoder(MAX_REQUEST_SIZE)
        #: Answers the socket would not take yet; while any wait, no requests are read.
        self.out = bytearray()
        #: Requests decoded but not answered: their batch's answers outgrew one write
        #: and the client is not reading them. Answered once `out` is flushed.
        self.held: list[Message] | None = None
        self.blocked_since = _INF
        self.last_active = now
        #: When the half-received frame now buffered began to arrive.
        self.partial_since = _INF
        #: Whether this peer may read a profile, decided once per connection and
        #: profile configuration (a reload replaces the configuration object).
        self.acl_cache: dict[str, tuple[object, bool]] = {}
        #: Ops of this connection still waiting, and their cancel scopes.
        self.waiting = 0
        self.tasks: set[trio.CancelScope] = set()
        #: Close once `out` is flushed (after a bad frame).
        self.closing = False
        self.closed = False


class Server:
    def __init__(
        self,
        api: Api,
        config: BrokerConfig,
        wall: WallClock,
        stats: ServerStats | None = None,
    ) -> None:
        self.api = api
        self.stats = stats or ServerStats()
        #: Waiting ops in flight by op (watches included), for the metrics.
        self.waiting_by_op: dict[str, int] = {}
        self._profiles = api.profiles  # the daemon's live table, changed in place on reload
        self._now = wall.now
        #: Waiting ops in flight, watches excluded: what a shutdown waits for.
        self.in_flight = 0
        self._connections: dict[int, Connection] = {}
        self._epoll = select.epoll()
        self._listener: socket.socket | None = None
        #: Whether the listener is registered in the epoll now (not while paused).
        self._accepting = False
        self._nursery: trio.Nursery | None = None
        self._drained = trio.Event()
        self._wake_housekeeper = trio.Event()
        self._next_check = _INF
        #: Bytes in every connection's `out`, and connections closed for leaving too
        #: many unread (a client that never reads its watch events, say).
        self.unread = 0
        self.overflows = 0
        #: Open connections per peer uid, and whether a peer identity may read nothing
        #: (per uid, gid and groups; forgotten at each reload).
        self._per_uid: dict[int, int] = {}
        self._strangers: dict[tuple[int, int, frozenset[int]], bool] = {}
        self.configure(config)

    def configure(self, config: BrokerConfig) -> None:
        """Limits and timeouts, at start and again at every reload."""
        self.max_connections = config.max_connections
        self.max_per_uid = config.max_connections_per_uid
        # Never more than half: a small max_connections still leaves others room.
        self.admin_reserve = min(config.admin_reserved_connections, config.max_connections // 2)
        self.stranger_idle_timeout = min(config.stranger_idle_timeout, config.idle_timeout)
        self._strangers = {}
        self.max_waiting = config.max_requests_per_connection
        self.idle_timeout = config.idle_timeout
        self.frame_timeout = config.frame_timeout
        self.send_timeout = config.send_timeout
        self.max_unread = config.max_unread_bytes
        self.max_unread_total = config.max_unread_total
        self._wake_housekeeper.set()

    @property
    def connections(self) -> int:
        return len(self._connections)

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
                nursery.start_soon(self._housekeeping)
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
        while self.in_flight:
            self._drained = trio.Event()
            await self._drained.wait()

    async def _reactor(self) -> None:
        epoll = self._epoll
        while True:
            await trio.lowlevel.wait_readable(epoll)
            # Under load, requests keep arriving while a batch is served: take a few
            # more batches straight from epoll before handing control back to trio.
            for _ in range(_BATCHES_PER_WAKEUP):
                ready = epoll.poll(0, _MAX_EVENTS)
                if not ready:
                    break
                self._serve_ready(ready, trio.current_time())

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
            if not self._admits(peer):
                self.stats.refused.inc(self._refusal_reason(peer))
                self.stats.errors.inc(Code.BUSY)
                _refuse(sock)
                continue
            stranger = self._is_stranger(peer)
            conn = Connection(sock, peer, now, stranger=stranger)
            self._connections[conn.fd] = conn
            self.stats.accepted += 1
            self._per_uid[peer.uid] = self._per_uid.get(peer.uid, 0) + 1
            self._epoll.register(conn.fd, _IN)
            self._check_timeouts_by(now + self._idle_limit(conn))

    def _admits(self, peer: Peer) -> bool:
        """Whether a new connection from `peer` fits. The last `admin_reserve` slots
        are for root and the daemon's user, and no other uid may hold more than
        `max_per_uid`: a stranger's flood of idle connections locks out no one."""
        total = len(self._connections)
        if self.api.is_admin(peer):
            return total < self.max_connections
        return (
            total < self.max_connections - self.admin_reserve
            and self._per_uid.get(peer.uid, 0) < self.max_per_uid
        )

    def _refusal_reason(self, peer: Peer) -> str:
        """Why `_admits` said no, for the metrics (a fixed set of reasons)."""
        if not self.api.is_admin(peer) and self._per_uid.get(peer.uid, 0) >= self.max_per_uid:
            return "max_per_uid"
        return "max_connections"

    def _is_stranger(self, peer: Peer) -> bool:
        """Whether `peer` may read no profile (so may do nothing but say hello)."""
        key = (peer.uid, peer.gid, peer.groups)
        stranger = self._strangers.get(key)
        if stranger is None:
            stranger = not self.api.is_admin(peer) and not any(
                self.api.may_read(peer, profile) for profile in self._profiles.values()
            )
            if len(self._strangers) >= _MAX_EVENTS:
                self._strangers.clear()
            self._strangers[key] = stranger
        return stranger

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
        if not data:
            self._close(conn)
            return
        conn.last_active = now
        self._answer(conn, data)
        if conn.closed or not conn.decoder.buffered or conn.decoder.complete:
            conn.partial_since = _INF
        elif conn.partial_since == _INF:
            # The clock starts with the first byte of a frame, not the latest one: a
            # byte every few seconds must not keep a half frame alive for ever.
            conn.partial_since = now
            self._check_timeouts_by(now + self.frame_timeout)

    def _answer(self, conn: Connection, data: bytes = b"") -> None:
        """Answer the requests received, a batch at a time, while the client takes the
        answers. One read can hold thousands of pipelined requests, whose answers are
        fifty times their size: those the client is not reading yet stay undecoded, or,
        once a batch's answers outgrow one write, decoded but unanswered (`held`)."""
        decoder = conn.decoder
        dispatch = self._dispatch
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
                answers.append(self._error_frame(None, BadFrame(str(decoder.error))))
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
        dispatch = self._dispatch
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

        What a client leaves unread is bounded: past `max_unread` bytes on its
        connection (beyond one answer, which may be larger), or past
        `max_unread_total` across all of them, the connection is closed and counted.
        Nothing else waits for it, so others are never slowed."""
        if conn.closed:
            return
        if conn.out:
            if len(conn.out) + len(data) > self.max_unread or not self._room(conn, len(data)):
                self._overflow(conn, len(data))
                return
            conn.out += data
            self.unread += len(data)
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            left = len(data) - sent
            if not self._room(conn, left):
                self._overflow(conn, left)
                return
            conn.out += data[sent:]
            self.unread += left
            conn.blocked_since = trio.current_time()
            self._epoll.modify(conn.fd, _OUT)
            self._check_timeouts_by(conn.blocked_since + self.send_timeout)

    def _room(self, conn: Connection, adding: int) -> bool:
        """Whether `adding` unread bytes fit in the total, after closing the connections
        that hold the most unread (the hogs, not whoever happens to write next: a slow
        reader must not pay for a connection that never reads). False when `conn`
        itself holds the most. Rare, so a scan of the connections is fine."""
        while self.unread + adding > self.max_unread_total:
            hog = max(self._connections.values(), key=lambda c: len(c.out))
            if hog is conn or len(hog.out) <= len(conn.out):
                return False
            self._overflow(hog, 0)
        return True

    def _overflow(self, conn: Connection, adding: int) -> None:
        self.overflows += 1
        log.warning(
            "connection_overflow",
            peer_uid=conn.peer.uid,
            unread=len(conn.out),
            adding=adding,
            unread_total=self.unread,
            closed_total=self.overflows,
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
        self.unread -= sent
        if conn.out:
            return
        conn.blocked_since = _INF
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
        uid = conn.peer.uid
        if (left := self._per_uid.get(uid, 1) - 1) > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)
        if conn.out:
            self.unread -= len(conn.out)
            conn.out = bytearray()
        del self._connections[conn.fd]
        self._epoll.unregister(conn.fd)
        conn.sock.close()
        for scope in conn.tasks:
            scope.cancel()

    # -- timeouts ------------------------------------------------------------------------

    def _deadline(self, conn: Connection) -> float:
        if conn.out:
            return conn.blocked_since + self.send_timeout
        if conn.partial_since != _INF:
            return conn.partial_since + self.frame_timeout
        if conn.waiting:
            return _INF
        return conn.last_active + self._idle_limit(conn)

    def _idle_limit(self, conn: Connection) -> float:
        return self.stranger_idle_timeout if conn.stranger else self.idle_timeout

    def _check_timeouts_by(self, when: float) -> None:
        if when < self._next_check:
            self._wake_housekeeper.set()

    async def _housekeeping(self) -> None:
        """Close connections past their deadline; sleep until the next one is due."""
        while True:
            now = trio.current_time()
            self._next_check = _INF
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

    # -- requests ------------------------------------------------------------------------

    def _dispatch(self, conn: Connection, message: Message) -> bytes | None:
        """The answer to one request, or None when a task will answer it later."""
        request_id = message.get("id")
        if type(request_id) is not int:
            return self._error_frame(None, BadRequest("field 'id' must be an integer"))
        op = message.get("op")
        try:
            if op == _TOKEN and (frame := self._token_from_memory(conn, request_id, message)):
                return frame
            if not isinstance(op, str):
                raise BadRequest("field 'op' must be a string")
            if op not in SCHEMAS:
                raise UnknownOp(f"unknown op {op!r}; this daemon speaks {', '.join(Op.ALL)}")
            args = arguments(op, message)
            immediate = self.api.immediate.get(op)
            if immediate is not None:
                return encode({"id": request_id, "ok": True, **immediate(conn.peer, args)})
            self._start_waiting(conn, request_id, op, args)
            return None
        except BrokerFault as exc:
            return self._error_frame(request_id, exc)
        except Exception:
            log.exception("internal_error", op=op, peer_uid=conn.peer.uid)
            return self._error_frame(request_id, Internal("internal error; see the daemon's log"))

    def _token_from_memory(
        self, conn: Connection, request_id: int, message: Message
    ) -> bytes | None:
        """The hot path: the token a profile holds, in its pre-encoded answer. None
        sends the request the long way (validation, waiting for a refresh)."""
        name = message.get("profile", DEFAULT_PROFILE)
        min_valid = message.get("min_valid", 0)
        profile = self._profiles.get(name) if type(name) is str else None
        if profile is None or type(min_valid) not in _NUMBERS or not min_valid >= 0:
            return None  # (not >= also catches NaN)
        cached = conn.acl_cache.get(name)
        if cached is not None and cached[0] is profile.config:
            allowed = cached[1]
        else:
            allowed = self.api.may_read(conn.peer, profile)
            conn.acl_cache[name] = (profile.config, allowed)
        if not allowed:
            profile.token_results.inc(Code.FORBIDDEN)
            raise Forbidden(f"uid {conn.peer.uid} may not read profile {name!r}")
        return profile.token_frame(request_id, min_valid, self._now())

    def _start_waiting(
        self, conn: Connection, request_id: int, op: str, args: dict[str, Any]
    ) -> None:
        if conn.waiting >= self.max_waiting:
            raise Busy(f"more than {self.max_waiting} requests waiting on this connection")
        assert self._nursery is not None
        self.waiting_by_op[op] = self.waiting_by_op.get(op, 0) + 1
        self.stats.waited.inc(op)
        if op == Op.WATCH:
            work = self._watch(conn, request_id, args)
        else:
            work = self._answer_later(conn, request_id, self.api.waiting[op](conn.peer, args))
            self.in_flight += 1
        conn.waiting += 1
        self._nursery.start_soon(self._run_waiting, conn, work, op, name=f"op:{op}")

    async def _run_waiting(self, conn: Connection, work: Awaitable[None], op: str) -> None:
        scope = trio.CancelScope()
        conn.tasks.add(scope)
        try:
            with scope:
                await work
        finally:
            conn.tasks.discard(scope)
            conn.waiting -= 1
            self.waiting_by_op[op] -= 1
            conn.last_active = trio.current_time()
            if op != Op.WATCH:
                self.in_flight -= 1
                if not self.in_flight:
                    self._drained.set()
            self._check_timeouts_by(conn.last_active + self._idle_limit(conn))

    async def _answer_later(
        self, conn: Connection, request_id: int, result: Awaitable[dict[str, Any]]
    ) -> None:
        try:
            frame = encode({"id": request_id, "ok": True, **(await result)})
        except BrokerFault as exc:
            frame = self._error_frame(request_id, exc)
        except Exception:
            log.exception("internal_error", peer_uid=conn.peer.uid)
            frame = self._error_frame(request_id, Internal("internal error; see the daemon's log"))
        self.write(conn, frame)

    async def _watch(self, conn: Connection, request_id: int, args: dict[str, Any]) -> None:
        async def emit(event: dict[str, Any]) -> None:
            self.write(conn, encode({"id": request_id, "ok": True, **event}))

        try:
            await self.api.watch(conn.peer, args, emit)
        except BrokerFault as exc:
            self.write(conn, self._error_frame(request_id, exc))

    def _error_frame(self, request_id: int | None, exc: BrokerFault) -> bytes:
        """An error answer, counted by its code (a fixed set: a bounded label)."""
        self.stats.errors.inc(exc.code)
        return error_frame(request_id, exc)


def _refuse(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.send(error_frame(None, Busy("too many connections; try again shortly")))
    sock.close()
