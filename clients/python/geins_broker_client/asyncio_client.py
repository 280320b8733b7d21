"""The client for asyncio programs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .aio import AsyncClient, AsyncLock, ConnectionLost, Stream

T = TypeVar("T")

_RECV_SIZE = 65536


class _AsyncioStream:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def send_all(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            raise ConnectionLost from exc

    async def receive_some(self) -> bytes:
        try:
            return await self._reader.read(_RECV_SIZE)
        except ConnectionError as exc:
            raise ConnectionLost from exc

    def stale(self) -> bool:
        return self._reader.at_eof() or self._writer.is_closing()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


class AsyncioClient(AsyncClient):
    def _make_lock(self) -> AsyncLock:
        return asyncio.Lock()

    async def _open_stream(self, path: str) -> Stream:
        reader, writer = await asyncio.open_unix_connection(path)
        return _AsyncioStream(reader, writer)

    async def _within(self, seconds: float | None, work: Callable[[], Awaitable[T]]) -> T:
        async with asyncio.timeout(seconds):
            return await work()
