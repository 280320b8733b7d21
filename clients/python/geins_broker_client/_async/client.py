"""The client, written once: this async source, and _sync/client.py generated from it.

Why generated rather than a sans-IO core both drive: the wire is already sans-IO
(`calls.Exchange` turns calls into frames and bytes into answers), and what is left is
control flow: checking the socket's owner before the first byte, mapping connect errors,
reconnecting once for an idempotent call after a daemon restart, dropping a connection
that fell out of step, a typed method per op, and `watch` as a generator. Pulled into a
state machine, that flow would come back as a driver loop in each flavour; with mypy
strict, one typed method per op cannot be shared between a sync and an async class any
other way. So, as httpcore does, the async code is the source and scripts/unasync.py
rewrites it line by line into the blocking client (coroutines become functions, awaits
disappear, class names lose their Async prefix, the event loop's backend becomes the
stdlib socket's). The generated file is committed; `scripts/unasync.py --check` (run by
scripts/test) fails when it drifts. Edit this file, then run `scripts/unasync.py`.

Everything that differs between flavours lives in a backend (`_backends/base.py` says what
one provides): the stdlib socket's (_backends/sync.py), trio's (_backends/trio.py) and
asyncio's (_backends/asyncio.py). tests/client/mock_backend.py drives this code on canned bytes.

One call at a time per client (a lock); the connection opens on first use and is kept;
if the daemon restarted in between, an idempotent call (token, user, status, hello) is
sent once more on a new connection, so a long-lived process rides through a restart.
"""

from __future__ import annotations

import os

from .. import calls
from .._backends.auto import default_backend
from .._backends.base import ConnectionLost
from ..calls import Exchange, answer
from ..errors import BrokerError, BrokerNotRunning, ProtocolError, Unavailable, UntrustedSocket
from ..paths import find_socket
from ..protocol import Code
from ..trust import path_problem, peer_problem, trusted_uids

TYPE_CHECKING = False  # no typing at run time: see calls.py
if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Mapping
    from typing import Any, Self, TypeVar

    from .._backends.base import AsyncBackend, AsyncStream
    from ..calls import Call
    from ..protocol import Message
    from ..results import (
        CustomerSession,
        Hello,
        ListedSession,
        Session,
        SessionInfo,
        SessionToken,
        Status,
        Token,
        User,
        WatchEvent,
    )

    T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


class _AsyncConnection:
    """One stream and its exchange state. Dropped for good on any error: out of step."""

    __slots__ = ("exchange", "stream")

    def __init__(self, stream: AsyncStream) -> None:
        self.stream = stream
        self.exchange = Exchange()

    async def round_trip(
        self, call: Call, parse: Callable[[Message], T], deadline: float | None
    ) -> T:
        try:
            request_id = await self.send(call, deadline)
        except ConnectionLost:
            # The daemon may have said why before it closed (busy: too many connections).
            await self.receive(-1, deadline)
            raise
        return answer(parse, await self.receive(request_id, deadline))

    async def send(self, call: Call, deadline: float | None) -> int:
        request_id, frame = self.exchange.request(call)
        await self.stream.send_all(frame, deadline)
        return request_id

    async def receive(self, request_id: int, deadline: float | None) -> Message:
        while True:
            data = await self.stream.receive_some(deadline)
            if not data:
                raise ConnectionLost
            message = self.exchange.receive(data, request_id)
            if message is not None:
                return message


class AsyncClient:
    """Talks to the daemon over its Unix socket; every op is a method.

    `timeout` bounds each call, connecting included (None: no limit). `backend` is the
    transport; by default the running event loop's (the stdlib socket's when blocking).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        backend: AsyncBackend | None = None,
    ) -> None:
        self._explicit_path = socket_path
        self.timeout = timeout
        self._backend = backend if backend is not None else default_backend()
        self._connection: _AsyncConnection | None = None
        self._lock = self._backend.lock()

    @property
    def socket_path(self) -> str:
        return find_socket(self._explicit_path)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        async with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.stream.close()

    def _deadline(self) -> float | None:
        return None if self.timeout is None else self._backend.clock() + self.timeout

    async def _connect(self, deadline: float | None) -> _AsyncConnection:
        """A new connection to a daemon that passed the trust rule, or the error why not."""
        path = self.socket_path
        trusted = trusted_uids()
        if (problem := path_problem(path, trusted)) is not None:
            raise UntrustedSocket(f"refusing {path}: {problem}")
        try:
            stream = await self._backend.connect(path, deadline)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise BrokerNotRunning(f"no broker is listening at {path} ({exc.strerror})") from None
        except TimeoutError:
            raise Unavailable(f"connecting to {path} timed out", Code.TIMEOUT) from None
        except OSError as exc:
            raise BrokerNotRunning(f"cannot connect to {path} ({exc.strerror})") from None
        try:
            problem = peer_problem(stream.peer_uid(), trusted)
        except OSError as exc:
            problem = f"its peer cannot be identified ({exc.strerror})"
        if problem is not None:
            stream.close()
            raise UntrustedSocket(f"refusing {path}: {problem}")
        return _AsyncConnection(stream)

    async def call(self, call: Call, parse: Callable[[Message], T]) -> T:
        """Send one request and wait for its answer, read by `parse`; raises the typed
        error the answer carries, within the client's `timeout`.

        A call interrupted half-way (a timeout, a cancellation, an unreadable answer)
        drops its connection: the next call starts on a new one.
        """
        async with self._lock:
            deadline = self._deadline()
            try:
                return await self._call_with_retry(call, parse, deadline)
            except TimeoutError:
                self._drop()
                raise Unavailable("the broker did not answer in time", Code.TIMEOUT) from None
            except BrokerError as exc:
                if isinstance(exc, ProtocolError):
                    self._drop()
                raise
            except BaseException:
                self._drop()
                raise

    async def _call_with_retry(
        self, call: Call, parse: Callable[[Message], T], deadline: float | None
    ) -> T:
        if self._connection is not None and self._connection.stream.stale():
            self._drop()
        reused = self._connection is not None
        for attempt in range(2):
            if self._connection is None:
                self._connection = await self._connect(deadline)
            try:
                return await self._connection.round_trip(call, parse, deadline)
            except ConnectionLost:
                self._drop()
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

    # -- customer sessions (docs/sessions.md) ------------------------------------------------

    async def session_login(
        self, app: str, username: str, password: str, *, remember: bool = False
    ) -> CustomerSession:
        """Log a customer in to `app`: a new session, named by the result's `handle`."""
        return await self.call(
            calls.session_login(app, username, password, remember), calls.parse_customer_session
        )

    async def session_register(
        self,
        app: str,
        username: str,
        password: str,
        *,
        remember: bool = False,
        user: Mapping[str, Any] | None = None,
    ) -> CustomerSession:
        """Create the customer's Geins account, and a session for it."""
        return await self.call(
            calls.session_register(app, username, password, remember, user),
            calls.parse_customer_session,
        )

    async def session_token(self, app: str, handle: str, *, min_valid: float = 0) -> SessionToken:
        """The customer's bearer, with at least `min_valid` seconds left."""
        return await self.call(
            calls.session_token(app, handle, min_valid), calls.parse_session_token
        )

    async def session_info(self, app: str, handle: str) -> SessionInfo:
        return await self.call(calls.session_info(app, handle), calls.parse_session_info)

    async def session_passwd(
        self, app: str, handle: str, password: str, new_password: str
    ) -> float:
        """Change the customer's password; returns the new bearer's expiry."""
        return await self.call(
            calls.session_passwd(app, handle, password, new_password), calls.parse_expires_at
        )

    async def session_logout(self, app: str, handle: str) -> None:
        """Log the session out at Geins and forget it; the handle names nothing after."""
        await self.call(calls.session_logout(app, handle), calls.parse_nothing)

    async def sessions(self, app: str, *, username: str | None = None) -> tuple[ListedSession, ...]:
        """An app's sessions, or one customer's (admins only; never a handle)."""
        return await self.call(calls.sessions(app, username), calls.parse_sessions)

    async def session_end(self, app: str, username: str) -> int:
        """End every session of a customer ("log out everywhere"; admins only)."""
        return await self.call(calls.session_end(app, username), calls.parse_ended)

    async def watch(self, profile: str | None = None) -> AsyncGenerator[WatchEvent]:
        """Each new token as the daemon rotates it, starting with the current one.

        Runs on a connection of its own, so the client stays usable meanwhile. Ends
        with BrokerNotRunning if the daemon goes away; closing the iterator closes the
        connection.
        """
        call = calls.watch(profile)
        deadline = self._deadline()
        connection = await self._connect(deadline)
        try:
            request_id = await connection.send(call, deadline)
            while True:
                yield answer(calls.parse_watch_event, await connection.receive(request_id, None))
        except ConnectionLost:
            raise BrokerNotRunning("the broker closed the watch") from None
        except TimeoutError:
            raise Unavailable("the broker did not take the watch in time", Code.TIMEOUT) from None
        finally:
            connection.stream.close()


__all__ = ["DEFAULT_TIMEOUT", "AsyncClient"]
