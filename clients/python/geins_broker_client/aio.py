"""The async client, independent of the event loop.

`TrioClient` and `AsyncioClient` fill in four small hooks (open a connection, send,
receive, apply a deadline); everything else, from request ids to reconnecting after a
daemon restart, lives here once.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar

from . import calls
from .calls import Call, Exchange, answer
from .errors import BrokerNotRunning, ProtocolError, Unavailable
from .paths import find_socket
from .protocol import Code
from .results import Hello, Session, Status, Token, User, WatchEvent

T = TypeVar("T")

if TYPE_CHECKING:
    from .protocol import Message

DEFAULT_TIMEOUT = 30.0


class Stream(Protocol):
    async def send_all(self, data: bytes) -> None: ...
    async def receive_some(self) -> bytes: ...
    async def aclose(self) -> None: ...

    def stale(self) -> bool:
        """Whether the daemon has closed the (idle) connection."""


class AsyncLock(Protocol):
    async def __aenter__(self) -> object: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> object: ...


class ConnectionLost(Exception):
    """The stream ended or broke; the transport raises this for every such error."""


class _AsyncConnection:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.exchange = Exchange()

    async def round_trip(self, call: Call, parse: Callable[[Message], T]) -> T:
        try:
            request_id = await self.send(call)
        except ConnectionLost:
            # The daemon may have said why before it closed (busy: too many connections).
            await self.receive(-1)
            raise
        return answer(parse, await self.receive(request_id))

    async def send(self, call: Call) -> int:
        request_id, frame = self.exchange.request(call)
        await self.stream.send_all(frame)
        return request_id

    async def receive(self, request_id: int) -> dict[str, Any]:
        while True:
            data = await self.stream.receive_some()
            if not data:
                raise ConnectionLost
            message = self.exchange.receive(data, request_id)
            if message is not None:
                return message


class AsyncClient(ABC):
    """The same calls as the blocking `Client`, awaited. One call at a time per client."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._explicit_path = socket_path
        self.timeout = timeout
        self._connection: _AsyncConnection | None = None
        self._lock = self._make_lock()

    # -- the four hooks a flavour provides -------------------------------------------

    @abstractmethod
    def _make_lock(self) -> AsyncLock: ...

    @abstractmethod
    async def _open_stream(self, path: str) -> Stream:
        """Connect, raising FileNotFoundError/ConnectionRefusedError/OSError as the OS does."""

    @abstractmethod
    async def _within(self, seconds: float | None, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work`, raising TimeoutError once `seconds` have passed."""

    # -- shared behaviour -------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        return find_socket(self._explicit_path)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()

    async def _drop(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            with contextlib.suppress(OSError, ConnectionLost):
                await connection.stream.aclose()

    async def _connect(self) -> _AsyncConnection:
        path = self.socket_path
        try:
            stream = await self._open_stream(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise BrokerNotRunning(f"no broker is listening at {path} ({exc.strerror})") from None
        except OSError as exc:
            raise BrokerNotRunning(f"cannot connect to {path} ({exc.strerror})") from None
        return _AsyncConnection(stream)

    async def call(self, call: Call, parse: Callable[[Message], T]) -> T:
        """One request and its answer, within the client's `timeout` (None: no limit).

        For a tighter bound on one call, wrap it in your event loop's own cancel scope
        or timeout; the connection is dropped if a call is interrupted half-way.
        """
        async with self._lock:
            try:
                return await self._within(self.timeout, lambda: self._call_with_retry(call, parse))
            except TimeoutError:
                await self._drop()
                raise Unavailable("the broker did not answer in time", Code.TIMEOUT) from None
            except ProtocolError:
                await self._drop()
                raise

    async def _call_with_retry(self, call: Call, parse: Callable[[Message], T]) -> T:
        if self._connection is not None and self._connection.stream.stale():
            await self._drop()
        reused = self._connection is not None
        for attempt in range(2):
            if self._connection is None:
                self._connection = await self._connect()
            try:
                return await self._connection.round_trip(call, parse)
            except ConnectionLost:
                await self._drop()
                if attempt or not (reused and call.idempotent):
                    break
        raise BrokerNotRunning("the broker closed the connection")

    async def hello(self, client: str | None = None) -> Hello:
        return await self.call(calls.hello(client), calls.parse_hello)

    async def token(self, profile: str | None = None, *, min_valid: float = 0) -> Token:
        return await self.call(calls.token(profile, min_valid), calls.parse_token)

    async def user(self, profile: str | None = None) -> User:
        return await self.call(calls.user(profile), calls.parse_user)

    async def status(self) -> Status:
        return await self.call(calls.status(), calls.parse_status)

    async def metrics(self) -> str:
        """The daemon's metrics in Prometheus' text format (root and its own user only)."""
        return await self.call(calls.metrics(), calls.parse_metrics)

    async def login(
        self, username: str, password: str, *, profile: str | None = None, remember: bool = False
    ) -> Session:
        return await self.call(
            calls.login(username, password, profile, remember), calls.parse_session
        )

    async def logout(self, profile: str | None = None) -> None:
        await self.call(calls.logout(profile), calls.parse_nothing)

    async def refresh(self, profile: str | None = None) -> Session:
        return await self.call(calls.refresh(profile), calls.parse_session)

    async def change_password(
        self, password: str, new_password: str, *, profile: str | None = None
    ) -> Session:
        return await self.call(
            calls.change_password(password, new_password, profile), calls.parse_session
        )

    async def register(
        self,
        username: str,
        password: str,
        *,
        profile: str | None = None,
        remember: bool = False,
        user: Mapping[str, Any] | None = None,
    ) -> Session:
        return await self.call(
            calls.register(username, password, profile, remember, user), calls.parse_session
        )

    async def watch(self, profile: str | None = None) -> AsyncIterator[WatchEvent]:
        """Each new token as the daemon rotates it, on a connection of its own."""
        call = calls.watch(profile)
        connection = await self._within(self.timeout, self._connect)
        try:
            request_id = await connection.send(call)
            while True:
                yield answer(calls.parse_watch_event, await connection.receive(request_id))
        except ConnectionLost:
            raise BrokerNotRunning("the broker closed the watch") from None
        finally:
            with contextlib.suppress(OSError, ConnectionLost):
                await connection.stream.aclose()
