"""A transport of canned bytes for the client core (aio.py and its generated twin).

Like httpcore's mock backend: each connection the client opens plays the next script,
a list of what successive reads return (bytes; b"" for the daemon hanging up) or raise
(an exception instance); a script that starts with SEND_FAILS breaks the first send
instead, as a daemon that hung up before reading does. What the client sends is kept as the daemon would have
received it, so a test can decode it. Nothing here blocks or needs an event loop: the
async flavour's coroutines finish without suspending, and `drive` runs them.
"""

from __future__ import annotations

import _thread
import os
from collections.abc import Awaitable, Generator
from typing import Any, TypeVar

from geins_broker_client._backends.base import ConnectionLost
from geins_broker_client.protocol import FrameDecoder, encode

T = TypeVar("T")
Step = bytes | BaseException

#: As the first step of a script: the first send finds the connection broken.
SEND_FAILS = ConnectionLost("the daemon hung up before reading")


def frame(**message: Any) -> bytes:
    return encode(message)


class MockStream:
    def __init__(self, script: list[Step], peer_uid: int) -> None:
        self.script = list(script)
        self.received = bytearray()
        self.closed = False
        self._peer_uid = peer_uid

    def messages(self) -> list[dict[str, Any]]:
        """What the daemon received on this connection, decoded."""
        return FrameDecoder().feed(bytes(self.received))

    def send_all(self, data: bytes, deadline: float | None) -> None:
        assert not self.closed, "sent on a closed stream"
        if self.script and self.script[0] is SEND_FAILS:
            self.script.pop(0)
            raise SEND_FAILS
        self.received += data

    def receive_some(self, deadline: float | None) -> bytes:
        assert not self.closed, "read from a closed stream"
        if not self.script:
            raise TimeoutError  # the daemon says nothing more: the deadline passes
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step

    def peer_uid(self) -> int:
        return self._peer_uid

    def stale(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class MockBackend:
    """The blocking flavour: `Client(path, backend=MockBackend(...))`."""

    def __init__(self, *scripts: list[Step] | BaseException, peer_uid: int | None = None) -> None:
        self.scripts = list(scripts)
        self.streams: list[MockStream] = []
        self.peer_uid = os.geteuid() if peer_uid is None else peer_uid

    def connect(self, path: str, deadline: float | None) -> MockStream:
        assert self.scripts, "the client opened more connections than the test expected"
        script = self.scripts.pop(0)
        if isinstance(script, BaseException):
            raise script
        stream = MockStream(script, self.peer_uid)
        self.streams.append(stream)
        return stream

    def lock(self) -> Any:
        return _thread.allocate_lock()

    def clock(self) -> float:
        return 1000.0


class _AsyncStream:
    def __init__(self, stream: MockStream) -> None:
        self.stream = stream

    async def send_all(self, data: bytes, deadline: float | None) -> None:
        self.stream.send_all(data, deadline)

    async def receive_some(self, deadline: float | None) -> bytes:
        return self.stream.receive_some(deadline)

    def peer_uid(self) -> int:
        return self.stream.peer_uid()

    def stale(self) -> bool:
        return self.stream.stale()

    def close(self) -> None:
        self.stream.close()


class _NoLock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class AsyncMockBackend(MockBackend):
    """The async flavour: `AsyncClient(path, backend=AsyncMockBackend(...))`."""

    async def connect(self, path: str, deadline: float | None) -> _AsyncStream:  # type: ignore[override]
        return _AsyncStream(MockBackend.connect(self, path, deadline))

    def lock(self) -> Any:
        return _NoLock()


def drive(awaitable: Awaitable[T]) -> T:
    """Run a coroutine that never suspends (the mock backend never waits)."""
    steps: Generator[Any, None, T] = awaitable.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise AssertionError("the coroutine waited: the mock backend never does")
