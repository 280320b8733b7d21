"""The blocking transport: a stdlib socket whose timeout follows the call's deadline."""

from __future__ import annotations

import _socket
import _thread
import time

from ..protocol import RECV_SIZE
from .base import ConnectionLost, hung_up, peer_uid_of, unix_socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .base import Lock


class SyncStream:
    __slots__ = ("_sock",)

    def __init__(self, sock: _socket.socket) -> None:
        self._sock = sock

    def send_all(self, data: bytes, deadline: float | None) -> None:
        _set_timeout(self._sock, deadline)
        try:
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionLost from exc

    def receive_some(self, deadline: float | None) -> bytes:
        _set_timeout(self._sock, deadline)
        try:
            return self._sock.recv(RECV_SIZE)
        except ConnectionResetError as exc:
            raise ConnectionLost from exc

    def peer_uid(self) -> int:
        return peer_uid_of(self._sock)

    def stale(self) -> bool:
        return hung_up(self._sock.fileno())

    def close(self) -> None:
        self._sock.close()


class SyncBackend:
    def connect(self, path: str, deadline: float | None) -> SyncStream:
        sock = unix_socket()
        try:
            _set_timeout(sock, deadline)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return SyncStream(sock)

    def lock(self) -> Lock:
        return _thread.allocate_lock()  # threading's, without importing threading

    def clock(self) -> float:
        return time.monotonic()


def default_backend() -> SyncBackend:
    return SyncBackend()


def _set_timeout(sock: _socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)
