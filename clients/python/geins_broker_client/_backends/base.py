"""What the client core asks of a transport, and the socket facts every transport shares.

A backend opens connections (`connect`), makes the client's lock and tells the time its
deadlines are measured in; a stream sends, receives, closes, reports whether the daemon
hung up while it was idle, and who is listening (SO_PEERCRED). The async types are what
_async/client.py is written against; the sync types are what scripts/unasync.py turns them into.

Deadlines are absolute times on the backend's clock (None: no limit). A stream raises
TimeoutError once its deadline has passed and ConnectionLost when the stream ends or
breaks; `connect` raises the OSError the system gave (FileNotFoundError, ...).
"""

from __future__ import annotations

import _socket  # not `socket`: its enums cost the CLI's start-up ~3 ms (see unix_socket)
import select
import struct

TYPE_CHECKING = False  # no typing at run time: see calls.py
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Protocol

    class Stream(Protocol):
        def send_all(self, data: bytes, deadline: float | None) -> None: ...
        def receive_some(self, deadline: float | None) -> bytes: ...
        def peer_uid(self) -> int: ...
        def stale(self) -> bool: ...
        def close(self) -> None: ...

    class AsyncStream(Protocol):
        async def send_all(self, data: bytes, deadline: float | None) -> None: ...
        async def receive_some(self, deadline: float | None) -> bytes: ...
        def peer_uid(self) -> int: ...
        def stale(self) -> bool: ...
        def close(self) -> None: ...

    class Lock(Protocol):
        def __enter__(self) -> object: ...
        def __exit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
            /,
        ) -> object: ...

    class AsyncLock(Protocol):
        async def __aenter__(self) -> object: ...
        async def __aexit__(
            self,
            exc_type: type[BaseException] | None,
            exc: BaseException | None,
            tb: TracebackType | None,
            /,
        ) -> object: ...

    class Backend(Protocol):
        def connect(self, path: str, deadline: float | None) -> Stream: ...
        def lock(self) -> Lock: ...
        def clock(self) -> float: ...

    class AsyncBackend(Protocol):
        async def connect(self, path: str, deadline: float | None) -> AsyncStream: ...
        def lock(self) -> AsyncLock: ...
        def clock(self) -> float: ...


class ConnectionLost(Exception):
    """The stream ended or broke; every transport raises this for every such error."""


_CREDENTIALS = struct.Struct("3i")


def peer_uid_of(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CREDENTIALS.size)
    uid: int = _CREDENTIALS.unpack(raw)[1]
    return uid


def hung_up(fileno: int) -> bool:
    """Whether an idle connection is readable: nothing is due from the daemon between
    calls, so that means an end of stream (or a last error before one)."""
    return bool(select.select([fileno], [], [], 0)[0])


#: (family, type) of the broker's socket, for `socket.socket(*UNIX_STREAM)`.
UNIX_STREAM = (_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)


def unix_socket() -> _socket.socket:
    """A new Unix stream socket for the blocking transport.

    The C-level `_socket.socket`, which does everything the blocking transport asks of a
    socket: the `socket` module adds enums (and `enum`, `selectors` and `functools` with
    them), about 3 ms of a one-shot `geins-broker token`'s start. The event loops' backends
    need `socket.socket` proper and make theirs from UNIX_STREAM.
    """
    return _socket.socket(*UNIX_STREAM)
