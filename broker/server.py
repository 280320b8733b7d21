"""The Unix-socket server: connections, peer credentials, framing, dispatch.

The hot path is `token` answered from memory, thousands of times a second, so the
connection loop is written against the raw socket with trio's readiness waits rather
than through the stream wrappers: one wait and one recv per batch of requests, every
complete frame in a read decoded and answered before the next read, and the answers
of a batch written with one send. Ops that may wait (a refresh, a login, a watch) run
as tasks in the connection's own nursery, so a slow request does not hold up the
ones behind it, and a connection's troubles end that connection only.

Limits: frames of at most 64 KiB; `max_connections` (beyond it a new connection gets a
`busy` frame and is closed); `max_requests_per_connection` waiting ops per connection;
idle connections, half-sent frames and unread answers time out.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Awaitable
from typing import Any, Final

import trio

from geins_broker_client.protocol import (
    MAX_REQUEST_SIZE,
    FrameDecoder,
    Message,
    Op,
    encode,
    error_body,
)

from .api import Api, Peer
from .config import BrokerConfig
from .errors import BadFrame, BadRequest, BrokerFault, Busy, Forbidden, Internal, UnknownOp
from .log import events
from .requests import SCHEMAS, arguments
from .wallclock import WallClock

log = events("broker.server")

_RECV_SIZE: Final = 65536
_CREDENTIALS: Final = struct.Struct("3i")
#: Linux's SO_PEERGROUPS (4.13+); the stdlib does not name it.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_INF: Final = float("inf")


class ConnectionGone(Exception):
    """The peer closed, reset, or stopped reading its answers."""


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    )
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        groups = frozenset()
    return Peer(pid, uid, gid, groups)


def error_frame(request_id: int | None, exc: BrokerFault) -> bytes:
    return encode({"id": request_id, **error_body(exc.code, str(exc))})


class Connection:
    __slots__ = (
        "closed",
        "idle",
        "peer",
        "readable",
        "send_lock",
        "send_timeout",
        "sock",
        "tasks",
        "waiting",
    )

    def __init__(self, sock: socket.socket, peer: Peer, send_timeout: float) -> None:
        self.sock = sock
        self.peer = peer
        self.send_timeout = send_timeout
        self.send_lock = trio.StrictFIFOLock()
        #: Profiles this peer may read, decided once per connection and profile.
        self.readable: dict[str, bool] = {}
        #: Ops of this connection that are still waiting.
        self.waiting = 0
        self.tasks: trio.Nursery | None = None
        self.idle = trio.CancelScope()
        self.closed = False

    async def send(self, data: bytes) -> None:
        """Write all of `data`, in order with other writers; ConnectionGone if the
        peer left or has not read for `send_timeout` seconds."""
        if not self.send_lock.locked():
            # Nobody is mid-write: try at once, without a checkpoint.
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise ConnectionGone from exc
            if sent == len(data):
                return
            data = data[sent:]
        async with self.send_lock:
            with trio.move_on_after(self.send_timeout):
                while data:
                    await trio.lowlevel.wait_writable(self.sock)
                    try:
                        data = data[self.sock.send(data) :]
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        raise ConnectionGone from exc
                return
            raise ConnectionGone("answers unread")


class Server:
    def __init__(self, api: Api, config: BrokerConfig, wall: WallClock) -> None:
        self.api = api
        self.wall = wall
        self.max_connections = config.max_connections
        self.max_waiting = config.max_requests_per_connection
        self.idle_timeout = config.idle_timeout
        self.frame_timeout = config.frame_timeout
        self.send_timeout = config.send_timeout
        self.connections = 0
        #: Waiting ops in flight, watches excluded: what a shutdown waits for.
        self.in_flight = 0
        self._drained = trio.Event()
        self._accepting = trio.CancelScope()

    # -- accepting ---------------------------------------------------------------------

    async def serve(
        self,
        listener: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until `stop_accepting`, then keep serving open connections until
        cancelled. `task_status.started()` fires once connections are being accepted."""
        listener.setblocking(False)
        async with trio.open_nursery() as nursery:
            with self._accepting:
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    self._accept_ready(listener, nursery)
            # Not accepting any more; established connections carry on until cancelled.
            await trio.sleep_forever()

    def _accept_ready(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept_failed", reason=exc.strerror)
                    return
                raise
            sock.setblocking(False)
            if self.connections >= self.max_connections:
                self._refuse(sock)
                continue
            self.connections += 1
            nursery.start_soon(self._connection, sock, name="connection")

    @staticmethod
    def _refuse(sock: socket.socket) -> None:
        frame = error_frame(None, Busy("too many connections; try again shortly"))
        with contextlib.suppress(OSError):
            sock.send(frame)
        sock.close()

    def stop_accepting(self) -> None:
        self._accepting.cancel()

    async def drained(self) -> None:
        """Return once no waiting op (other than watches) is in flight."""
        while self.in_flight:
            self._drained = trio.Event()
            await self._drained.wait()

    # -- one connection ------------------------------------------------------------------

    async def _connection(self, sock: socket.socket) -> None:
        try:
            conn = Connection(sock, peer_of(sock), self.send_timeout)
            async with trio.open_nursery() as tasks:
                conn.tasks = tasks
                with contextlib.suppress(ConnectionGone):
                    await self._read_loop(conn)
                conn.closed = True
                tasks.cancel_scope.cancel()
        except Exception:
            # A bug in one connection's handling ends that connection, not the server.
            log.exception("connection_failed")
        finally:
            self.connections -= 1
            sock.close()

    async def _read_loop(self, conn: Connection) -> None:
        sock = conn.sock
        decoder = FrameDecoder(MAX_REQUEST_SIZE)
        with conn.idle:
            while True:
                self._set_idle_deadline(conn, decoder.buffered)
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(_RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                answers = [a for m in decoder.feed(data) if (a := self._dispatch(conn, m))]
                if decoder.error is not None:
                    answers.append(error_frame(None, BadFrame(str(decoder.error))))
                    await conn.send(b"".join(answers))
                    return
                if answers:
                    await conn.send(answers[0] if len(answers) == 1 else b"".join(answers))

    def _set_idle_deadline(self, conn: Connection, buffered: int) -> None:
        if buffered:
            conn.idle.deadline = trio.current_time() + self.frame_timeout
        elif conn.waiting:
            conn.idle.deadline = _INF
        else:
            conn.idle.deadline = trio.current_time() + self.idle_timeout

    def _dispatch(self, conn: Connection, message: Message) -> bytes | None:
        """The answer to one request, or None when a task will answer it later."""
        request_id = message.get("id")
        if type(request_id) is not int:
            return error_frame(None, BadRequest("field 'id' must be an integer"))
        op = message.get("op")
        try:
            if op == Op.TOKEN:
                frame = self._token_from_memory(conn, request_id, message)
                if frame is not None:
                    return frame
            if not isinstance(op, str):
                raise BadRequest("field 'op' must be a string")
            if op not in SCHEMAS:
                raise UnknownOp(f"unknown op {op!r}; this daemon speaks {', '.join(Op.ALL)}")
            args = arguments(op, message)
            immediate = self.api.immediate.get(op)
            if immediate is not None:
                return encode({"id": request_id, "ok": True, **immediate(conn.peer, args)})
            return self._start_waiting(conn, request_id, op, args)
        except BrokerFault as exc:
            return error_frame(request_id, exc)
        except Exception:
            log.exception("internal_error", op=op, peer_uid=conn.peer.uid)
            return error_frame(request_id, Internal("internal error; see the daemon's log"))

    def _token_from_memory(
        self, conn: Connection, request_id: int, message: Message
    ) -> bytes | None:
        """The hot path: a token the profile holds, in its pre-encoded answer."""
        name = message.get("profile", "default")
        min_valid = message.get("min_valid", 0)
        if type(name) is not str or type(min_valid) not in (int, float):
            return None  # let the full validation say what is wrong
        profile = self.api.profiles.get(name)
        if profile is None:
            return None
        allowed = conn.readable.get(name)
        if allowed is None:
            allowed = conn.readable[name] = self.api.may_read(conn.peer, profile)
        if not allowed:
            raise Forbidden(f"uid {conn.peer.uid} may not read profile {name!r}")
        return profile.token_frame(request_id, min_valid, self.wall.now())

    def _start_waiting(
        self, conn: Connection, request_id: int, op: str, args: dict[str, Any]
    ) -> bytes | None:
        if conn.waiting >= self.max_waiting:
            raise Busy(f"more than {self.max_waiting} requests waiting on this connection")
        assert conn.tasks is not None
        if op == Op.WATCH:
            work = self._watch(conn, request_id, args)
        else:
            work = self._answer_later(conn, request_id, self.api.waiting[op](conn.peer, args))
            self.in_flight += 1
        conn.waiting += 1
        conn.idle.deadline = _INF
        conn.tasks.start_soon(self._guarded, conn, work, op != Op.WATCH, name=f"op:{op}")
        return None

    async def _guarded(self, conn: Connection, work: Awaitable[None], counted: bool) -> None:
        try:
            await work
        except ConnectionGone:
            conn.idle.cancel()  # the read loop ends, and the connection with it
        finally:
            conn.waiting -= 1
            if counted:
                self.in_flight -= 1
                if not self.in_flight:
                    self._drained.set()
            if not conn.waiting and not conn.closed:
                conn.idle.deadline = trio.current_time() + self.idle_timeout

    async def _answer_later(
        self, conn: Connection, request_id: int, result: Awaitable[dict[str, Any]]
    ) -> None:
        try:
            frame = encode({"id": request_id, "ok": True, **(await result)})
        except BrokerFault as exc:
            frame = error_frame(request_id, exc)
        except Exception:
            log.exception("internal_error", peer_uid=conn.peer.uid)
            frame = error_frame(request_id, Internal("internal error; see the daemon's log"))
        await conn.send(frame)

    async def _watch(self, conn: Connection, request_id: int, args: dict[str, Any]) -> None:
        async def emit(event: dict[str, Any]) -> None:
            await conn.send(encode({"id": request_id, "ok": True, **event}))

        try:
            await self.api.watch(conn.peer, args, emit)
        except BrokerFault as exc:
            await conn.send(error_frame(request_id, exc))
