"""trio's transport: a trio socket stream, deadlines as trio cancel scopes."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import trio

from ..protocol import RECV_SIZE
from .base import UNIX_STREAM, ConnectionLost, hung_up, peer_uid_of

_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class TrioStream:
    __slots__ = ("_stream",)

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream

    async def send_all(self, data: bytes, deadline: float | None) -> None:
        with _deadline(deadline):
            try:
                await self._stream.send_all(data)
            except _BROKEN as exc:
                raise ConnectionLost from exc

    async def receive_some(self, deadline: float | None) -> bytes:
        with _deadline(deadline):
            try:
                return bytes(await self._stream.receive_some(RECV_SIZE))
            except _BROKEN as exc:
                raise ConnectionLost from exc

    def peer_uid(self) -> int:
        return peer_uid_of(self._stream.socket)  # type: ignore[arg-type]

    def stale(self) -> bool:
        return hung_up(self._stream.socket.fileno())

    def close(self) -> None:
        self._stream.socket.close()


class TrioBackend:
    async def connect(self, path: str, deadline: float | None) -> TrioStream:
        sock = trio.socket.from_stdlib_socket(socket.socket(*UNIX_STREAM))
        try:
            with _deadline(deadline):
                await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return TrioStream(trio.SocketStream(sock))

    def lock(self) -> trio.Lock:
        return trio.Lock()

    def clock(self) -> float:
        return trio.current_time()


@contextlib.contextmanager
def _deadline(deadline: float | None) -> Iterator[None]:
    """trio.fail_at(deadline) raising TimeoutError, or no limit for None."""
    if deadline is None:
        yield
        return
    try:
        with trio.fail_at(deadline):
            yield
    except trio.TooSlowError:
        raise TimeoutError from None
