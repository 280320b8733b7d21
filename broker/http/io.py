"""Reads and writes on a connected trio socket that skip the scheduler when they can.

`trio.SocketStream.receive_some` and `send_all` pass through trio's scheduler on every
call, even when the kernel has the bytes (or the room) at once: a checkpoint before
and a yield after each system call. Here the system call is tried first, and only
EAGAIN waits (`wait_readable` / `wait_writable`), and only a wait opens a cancel
scope for its deadline: most calls of a request open none.

What a caller may rely on: the semantics of the stream methods they replace, except
that a call which does not wait is not a checkpoint. Every loop that uses them must
wait somewhere for its peer, or checkpoint itself (the server shell does, when a
request head was already buffered); a cancel scope around a call that does not wait
takes effect at the next one. `waits()` counts the waits of every task: if it has not
changed across a stretch of code, that code never let another task run (trio has one
thread, so another task's wait in between would mean this one had yielded).

Deadlines are trio times passed in, and only a wait looks at them (trio.TooSlowError).
Errors: a reset or a closed socket reads as b"" (the end of input, as h11 wants
it); a failed write raises trio.BrokenResourceError, like `send_all`. The socket
stays owned by its SocketStream (which set TCP_NODELAY and closes it); these functions
only borrow its descriptor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from typing import Final

import trio

READ_SIZE: Final = 65536

Wait = Callable[[trio.socket.SocketType], Awaitable[None]]


class _Counter:
    waits = 0


def waits() -> int:
    """How many times these functions have waited, in every task so far."""
    return _Counter.waits


async def _wait(wait: Wait, sock: trio.socket.SocketType, deadline: float) -> None:
    _Counter.waits += 1
    if deadline == math.inf:
        await wait(sock)
        return
    with trio.move_on_at(deadline):
        await wait(sock)
        return
    raise trio.TooSlowError


async def receive_some(
    sock: trio.socket.SocketType, deadline: float = math.inf, size: int = READ_SIZE
) -> bytes:
    """Up to `size` bytes; b"" at the end of input, on a reset or once closed."""
    while True:
        try:
            return os.read(sock.fileno(), size)
        except BlockingIOError:
            pass
        except OSError:
            return b""  # reset, or the descriptor closed under us (fileno() is -1)
        await _wait(trio.lowlevel.wait_readable, sock, deadline)


async def send_all(sock: trio.socket.SocketType, data: bytes, deadline: float = math.inf) -> None:
    """All of `data`, or trio.BrokenResourceError if the peer is gone."""
    view = memoryview(data)
    while view:
        try:
            sent = os.write(sock.fileno(), view)
        except BlockingIOError:
            await _wait(trio.lowlevel.wait_writable, sock, deadline)
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"send failed ({type(exc).__name__})") from None
        view = view[sent:]
