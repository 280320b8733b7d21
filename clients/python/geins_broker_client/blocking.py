"""The blocking client: a stdlib socket, one call at a time, safe to share between threads."""

from __future__ import annotations

import _thread
import os
import select
import socket
import time

from . import calls
from .calls import Call, Exchange, answer
from .errors import BrokerError, BrokerNotRunning, ProtocolError, Unavailable
from .paths import find_socket
from .protocol import Code
from .results import Hello, Session, Status, Token, User, WatchEvent

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from typing import Any, TypeVar

    from .protocol import Message

    T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0
_RECV_SIZE = 65536


class _ConnectionLost(Exception):
    pass


class _Connection:
    """One socket and its exchange state. Closed for good on any error: out of step."""

    def __init__(self, path: str, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            sock.close()
            raise BrokerNotRunning(f"no broker is listening at {path} ({exc.strerror})") from None
        except TimeoutError:
            sock.close()
            raise Unavailable(f"connecting to {path} timed out", Code.TIMEOUT) from None
        except OSError as exc:
            sock.close()
            raise BrokerNotRunning(f"cannot connect to {path} ({exc.strerror})") from None
        self.sock = sock
        self.exchange = Exchange()

    def send(self, call: Call, deadline: float | None) -> int:
        request_id, frame = self.exchange.request(call)
        self._set_timeout(deadline)
        try:
            self.sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ConnectionLost from exc
        return request_id

    def receive(self, request_id: int, deadline: float | None) -> dict[str, Any]:
        while True:
            self._set_timeout(deadline)
            try:
                data = self.sock.recv(_RECV_SIZE)
            except ConnectionResetError as exc:
                raise _ConnectionLost from exc
            if not data:
                raise _ConnectionLost
            message = self.exchange.receive(data, request_id)
            if message is not None:
                return message

    def stale(self) -> bool:
        """Whether the daemon closed this idle connection (timeout, restart).

        Between calls nothing is due from the daemon, so a readable socket means an
        end of stream (or a last error before one): reconnect rather than send.
        """
        return bool(select.select([self.sock], [], [], 0)[0])

    def _set_timeout(self, deadline: float | None) -> None:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)

    def close(self) -> None:
        self.sock.close()


class Client:
    """Talks to the daemon over its Unix socket.

    The connection opens on first use and is kept; if the daemon restarted in between,
    an idempotent call (token, user, status, hello) is sent once more on a new
    connection, so a long-lived process rides through a restart without noticing.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        self._explicit_path = socket_path
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._lock = _thread.allocate_lock()  # threading's, without importing threading

    @property
    def socket_path(self) -> str:
        return find_socket(self._explicit_path)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def call(self, call: Call, parse: Callable[[Message], T], timeout: float | None = None) -> T:
        """Send one request and wait for its answer, read by `parse`; raises the typed
        error the answer carries."""
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        with self._lock:
            reused = self._connection is not None
            try:
                return self._round_trip(call, parse, deadline)
            except _ConnectionLost:
                self._drop()
                if not (reused and call.idempotent):
                    raise BrokerNotRunning("the broker closed the connection") from None
            try:
                return self._round_trip(call, parse, deadline)
            except _ConnectionLost:
                self._drop()
                raise BrokerNotRunning("the broker closed the connection") from None

    def _round_trip(self, call: Call, parse: Callable[[Message], T], deadline: float | None) -> T:
        if self._connection is not None and self._connection.stale():
            self._drop()
        if self._connection is None:
            self._connection = _Connection(self.socket_path, _first_timeout(deadline))
        connection = self._connection
        try:
            try:
                request_id = connection.send(call, deadline)
            except _ConnectionLost:
                # The daemon may have said why before it closed (busy: too many connections).
                connection.receive(-1, deadline)
                raise
            return answer(parse, connection.receive(request_id, deadline))
        except TimeoutError:
            self._drop()
            raise Unavailable("the broker did not answer in time", Code.TIMEOUT) from None
        except ProtocolError:
            self._drop()
            raise

    def hello(self, client: str | None = None) -> Hello:
        return self.call(calls.hello(client), calls.parse_hello)

    def token(self, profile: str | None = None, *, min_valid: float = 0) -> Token:
        return self.call(calls.token(profile, min_valid), calls.parse_token)

    def user(self, profile: str | None = None) -> User:
        return self.call(calls.user(profile), calls.parse_user)

    def status(self) -> Status:
        return self.call(calls.status(), calls.parse_status)

    def metrics(self) -> str:
        """The daemon's metrics in Prometheus' text format (root and its own user only)."""
        return self.call(calls.metrics(), calls.parse_metrics)

    def login(
        self, username: str, password: str, *, profile: str | None = None, remember: bool = False
    ) -> Session:
        return self.call(calls.login(username, password, profile, remember), calls.parse_session)

    def logout(self, profile: str | None = None) -> None:
        self.call(calls.logout(profile), calls.parse_nothing)

    def refresh(self, profile: str | None = None) -> Session:
        return self.call(calls.refresh(profile), calls.parse_session)

    def change_password(
        self, password: str, new_password: str, *, profile: str | None = None
    ) -> Session:
        return self.call(
            calls.change_password(password, new_password, profile), calls.parse_session
        )

    def register(
        self,
        username: str,
        password: str,
        *,
        profile: str | None = None,
        remember: bool = False,
        user: Mapping[str, Any] | None = None,
    ) -> Session:
        return self.call(
            calls.register(username, password, profile, remember, user), calls.parse_session
        )

    def watch(self, profile: str | None = None) -> Iterator[WatchEvent]:
        """Each new token as the daemon rotates it, starting with the current one.

        Runs on a connection of its own, so the client stays usable meanwhile. Ends
        with BrokerNotRunning if the daemon goes away; closing the iterator closes the
        connection.
        """
        call = calls.watch(profile)
        connection = _Connection(self.socket_path, _first_timeout(None, self.timeout))
        try:
            request_id = connection.send(call, None)
            connection.sock.settimeout(None)
            while True:
                yield answer(calls.parse_watch_event, connection.receive(request_id, None))
        except _ConnectionLost:
            raise BrokerNotRunning("the broker closed the watch") from None
        finally:
            connection.close()


def _first_timeout(deadline: float | None, default: float | None = DEFAULT_TIMEOUT) -> float:
    if deadline is None:
        return default if default is not None else DEFAULT_TIMEOUT
    return max(deadline - time.monotonic(), 0.001)


__all__ = ["BrokerError", "Client"]
