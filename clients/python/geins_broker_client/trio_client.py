"""The client for trio programs. Importing it imports trio; the package root does not."""

from __future__ import annotations

import select
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .aio import AsyncClient, AsyncLock, ConnectionLost, Stream

T = TypeVar("T")

_RECV_SIZE = 65536


class _TrioStream:
    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream

    async def send_all(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost from exc

    async def receive_some(self) -> bytes:
        try:
            return bytes(await self._stream.receive_some(_RECV_SIZE))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost from exc

    async def aclose(self) -> None:
        await self._stream.aclose()

    def stale(self) -> bool:
        # Nothing is due between calls: a readable socket means the daemon hung up.
        return bool(select.select([self._stream.socket.fileno()], [], [], 0)[0])


class TrioClient(AsyncClient):
    def _make_lock(self) -> AsyncLock:
        return trio.Lock()

    async def _open_stream(self, path: str) -> Stream:
        return _TrioStream(await trio.open_unix_socket(path))

    async def _within(self, seconds: float | None, work: Callable[[], Awaitable[T]]) -> T:
        if seconds is None:
            return await work()
        try:
            with trio.fail_after(seconds):
                return await work()
        except trio.TooSlowError:
            raise TimeoutError from None
