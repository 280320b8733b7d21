"""The client core on canned bytes: no daemon, no event loop, both generated flavours.

Every test runs twice, against the async source (_async.client.AsyncClient) and the blocking
client generated from it (_sync.client.Client), through tests/client/mock_backend.py.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from geins_broker_client import (
    BrokerNotRunning,
    NotLoggedIn,
    ProtocolError,
    Token,
    Unavailable,
    UntrustedSocket,
)
from geins_broker_client._async.client import AsyncClient
from geins_broker_client._sync.client import Client
from tests.client.mock_backend import SEND_FAILS, AsyncMockBackend, MockBackend, Step, drive, frame

TOKEN = {"ok": True, "profile": "default", "token": "a.b.c", "expires_at": 2000.0}


class Flavour:
    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path

    def client(self, *scripts: list[Step] | BaseException, peer_uid: int | None = None) -> Any:
        if self.name == "blocking":
            self.backend = MockBackend(*scripts, peer_uid=peer_uid)
            return Client(self.path, backend=self.backend)
        self.backend = AsyncMockBackend(*scripts, peer_uid=peer_uid)
        return AsyncClient(self.path, backend=self.backend)

    @staticmethod
    def run(result: Any) -> Any:
        return drive(result) if inspect.isawaitable(result) else result

    def next_event(self, events: Any) -> Any:
        return next(events) if self.name == "blocking" else drive(events.__anext__())


@pytest.fixture
def socket_file(short_tmp: Path) -> Iterator[Path]:
    """A real socket file in a private directory, so the path rule has something to pass."""
    path = short_tmp / "b.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    yield path
    sock.close()


@pytest.fixture(params=["blocking", "async"])
def flavour(request: pytest.FixtureRequest, socket_file: Path) -> Flavour:
    return Flavour(request.param, socket_file)


def test_an_answer_split_into_single_bytes(flavour: Flavour) -> None:
    answer = frame(id=1, **TOKEN)
    client = flavour.client([answer[i : i + 1] for i in range(len(answer))])
    token = flavour.run(client.token(min_valid=30))
    assert token == Token("default", "a.b.c", 2000.0)
    (stream,) = flavour.backend.streams
    assert stream.messages() == [{"id": 1, "op": "token", "min_valid": 30}]


def test_an_error_answer_raises_its_type_and_keeps_the_connection(flavour: Flavour) -> None:
    refused = frame(id=1, ok=False, error={"code": "not_logged_in", "message": "log in first"})
    client = flavour.client([refused, frame(id=2, **TOKEN)])
    with pytest.raises(NotLoggedIn, match="log in first"):
        flavour.run(client.token())
    assert flavour.run(client.token()).token == "a.b.c"
    assert len(flavour.backend.streams) == 1


def test_an_idempotent_call_is_sent_again_after_a_restart(flavour: Flavour) -> None:
    client = flavour.client([frame(id=1, **TOKEN), b""], [frame(id=1, **TOKEN)])
    flavour.run(client.token())
    assert flavour.run(client.token()).token == "a.b.c"  # on a second connection
    first, second = flavour.backend.streams
    assert [m["op"] for m in first.messages()] == ["token", "token"]
    assert [m["op"] for m in second.messages()] == ["token"]
    assert first.closed


def test_a_login_is_never_sent_twice(flavour: Flavour) -> None:
    client = flavour.client([frame(id=1, **TOKEN), b""], [frame(id=1, **TOKEN)])
    flavour.run(client.token())
    with pytest.raises(BrokerNotRunning, match="closed the connection"):
        flavour.run(client.login("someone", "pw"))
    assert len(flavour.backend.streams) == 1  # no second connection, no second login


def test_a_fresh_connection_that_closes_is_not_retried(flavour: Flavour) -> None:
    client = flavour.client([b""], [frame(id=1, **TOKEN)])
    with pytest.raises(BrokerNotRunning):
        flavour.run(client.token())
    assert len(flavour.backend.streams) == 1


@pytest.mark.parametrize("send_fails", [False, True])
def test_busy_said_before_hanging_up_is_unavailable(flavour: Flavour, send_fails: bool) -> None:
    """The daemon says `busy` without an id and hangs up, maybe before reading the request."""
    busy = frame(id=None, ok=False, error={"code": "busy", "message": "too many connections"})
    client = flavour.client([SEND_FAILS, busy, b""] if send_fails else [busy, b""])
    with pytest.raises(Unavailable, match="too many connections") as info:
        flavour.run(client.status())
    assert info.value.code == "busy"


def test_a_malformed_answer_drops_the_connection(flavour: Flavour) -> None:
    bad_type = frame(id=1, ok=True, profile="default", token="a.b.c", expires_at=True)
    client = flavour.client([bad_type], [b"\x00\x00\x00\x01\xc1"])
    with pytest.raises(ProtocolError, match="expires_at"):
        flavour.run(client.token())
    with pytest.raises(ProtocolError, match="unreadable response"):
        flavour.run(client.token())
    first, second = flavour.backend.streams
    assert first.closed and second.closed


def test_a_timeout_is_unavailable_and_drops_the_connection(flavour: Flavour) -> None:
    client = flavour.client([TimeoutError()], [frame(id=1, **TOKEN)])
    with pytest.raises(Unavailable) as info:
        flavour.run(client.token())
    assert info.value.code == "timeout"
    assert flavour.backend.streams[0].closed
    assert flavour.run(client.token()).token == "a.b.c"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FileNotFoundError(2, "No such file or directory"), "no broker is listening"),
        (ConnectionRefusedError(111, "Connection refused"), "no broker is listening"),
        (PermissionError(13, "Permission denied"), "cannot connect"),
    ],
)
def test_connect_errors_are_broker_not_running(
    flavour: Flavour, error: OSError, expected: str
) -> None:
    client = flavour.client(error)
    with pytest.raises(BrokerNotRunning, match=expected) as info:
        flavour.run(client.hello())
    assert str(flavour.path) in info.value.message


def test_a_peer_of_another_uid_hears_nothing(flavour: Flavour) -> None:
    client = flavour.client([frame(id=1, ok=True)], peer_uid=54321)
    with pytest.raises(UntrustedSocket, match="runs as uid 54321") as info:
        flavour.run(client.login("someone", "the-password"))
    assert str(flavour.path) in info.value.message
    assert "the-password" not in repr(info.value)
    (stream,) = flavour.backend.streams
    assert stream.received == b""
    assert stream.closed


def test_a_socket_under_a_writable_directory_is_never_connected(
    flavour: Flavour, socket_file: Path
) -> None:
    socket_file.parent.chmod(0o777)
    client = flavour.client([frame(id=1, ok=True)])
    with pytest.raises(UntrustedSocket, match="may be written by others"):
        flavour.run(client.hello())
    assert flavour.backend.streams == []


def test_watch_yields_each_event_until_the_daemon_leaves(flavour: Flavour) -> None:
    first = frame(id=1, ok=True, event="token", **{k: v for k, v in TOKEN.items() if k != "ok"})
    ended = frame(id=1, ok=True, event="logged_out")
    client = flavour.client([first, ended, b""])
    events = client.watch()
    assert flavour.next_event(events).token.token == "a.b.c"
    assert flavour.next_event(events).token is None
    with pytest.raises(BrokerNotRunning, match="closed the watch"):
        flavour.next_event(events)
    (stream,) = flavour.backend.streams
    assert stream.messages() == [{"id": 1, "op": "watch"}]
    assert stream.closed


def _unasync_script() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "unasync.py"
    spec = importlib.util.spec_from_file_location("unasync", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_blocking_client_is_the_generated_twin_of_the_async_one() -> None:
    unasync = _unasync_script()
    assert unasync.main(["--check"]) == 0
    twin, _ = unasync.unasync(
        "class _AsyncConnection(AsyncClient):\n"
        "    async def __aenter__(self) -> AsyncIterator[int]:\n"
        "        async with self._lock:\n"
        "            await self.aclose()\n"
    )
    assert twin == unasync.HEADER + (
        "class _Connection(Client):\n"
        "    def __enter__(self) -> Iterator[int]:\n"
        "        with self._lock:\n"
        "            self.close()\n"
    )
