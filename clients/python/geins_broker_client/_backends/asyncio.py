"""asyncio's transport: the stdlib socket driven by the running loop."""

from __future__ import annotations

import asyncio
import socket

from ..protocol import RECV_SIZE
from .base import UNIX_STREAM, ConnectionLost, hung_up, peer_uid_of


class AsyncioStream:
    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def send_all(self, data: bytes, deadline: float | None) -> None:
        async with asyncio.timeout_at(deadline):
            try:
                await asyncio.get_running_loop().sock_sendall(self._sock, data)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionLost from exc

    async def receive_some(self, deadline: float | None) -> bytes:
        async with asyncio.timeout_at(deadline):
            try:
                return await asyncio.get_running_loop().sock_recv(self._sock, RECV_SIZE)
            except ConnectionResetError as exc:
                raise ConnectionLost from exc

    def peer_uid(self) -> int:
        return peer_uid_of(self._sock)

    def stale(self) -> bool:
        return hung_up(self._sock.fileno())

    def close(self) -> None:
        self._sock.close()


class AsyncioBackend:
    async def connect(self, path: str, deadline: float | None) -> AsyncioStream:
        sock = socket.socket(*UNIX_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return AsyncioStream(sock)

    def lock(self) -> asyncio.Lock:
        return asyncio.Lock()

    def clock(self) -> float:
        return asyncio.get_running_loop().time()
