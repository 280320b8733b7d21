"""Accepting under overload: out of file descriptors, the server pauses, not spins.

A fake listener that is always readable and whose accept() fails with one errno stands
in for a process out of descriptors, as trio's own tests do for serve_listeners
(a real EMFILE would take every descriptor of the test process too).
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from broker.core.clock import SystemClock
from broker.daemon import config as config_module
from broker.rpc.ops import Api
from broker.rpc.reactor import _ACCEPT_PAUSE, ACCEPT_CAPACITY_ERRNOS, Server


class FakeListener:
    """Readable for ever (a byte waits in a socketpair); accept() raises `error`."""

    def __init__(self, error: BaseException) -> None:
        self._readable, self._writer = socket.socketpair()
        self._writer.send(b"x")
        self.error = error
        self.accepts = 0

    def fileno(self) -> int:
        return self._readable.fileno()

    def setblocking(self, flag: bool) -> None:
        pass

    def accept(self) -> tuple[socket.socket, object]:
        self.accepts += 1
        raise self.error

    def close(self) -> None:
        self._readable.close()
        self._writer.close()


def _server(tmp: Path) -> Server:
    data = {
        "broker": {"socket": str(tmp / "s.sock"), "state_dir": str(tmp / "state")},
        "profiles": {"default": {"account": "shop", "api_key": "k"}},
    }
    config = config_module.parse(data, tmp / "config.toml")
    return Server(Api({}), config, SystemClock())


def test_the_capacity_errnos_are_named() -> None:
    assert {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM} == ACCEPT_CAPACITY_ERRNOS


@pytest.mark.parametrize("code", sorted(ACCEPT_CAPACITY_ERRNOS), ids=errno.errorcode.get)
async def test_out_of_resources_pauses_accepting_then_resumes(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path, code: int
) -> None:
    listener = FakeListener(OSError(code, os.strerror(code)))
    server = _server(tmp_path)
    await nursery.start(server.serve, listener)
    await trio.sleep(_ACCEPT_PAUSE / 2)
    assert listener.accepts == 1  # paused after the first failure, not spinning
    await trio.sleep(_ACCEPT_PAUSE)
    assert listener.accepts == 2  # one pause later it tried again
    assert server.stats.refused.get("out_of_resources") == 2  # what the metrics show
    nursery.cancel_scope.cancel()
    listener.close()


async def test_stop_accepting_during_a_pause_is_safe(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A SIGTERM within the pause used to raise FileNotFoundError from stop_accepting
    (the listener was no longer in the epoll) and skip the drain."""
    listener = FakeListener(OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
    server = _server(tmp_path)
    await nursery.start(server.serve, listener)
    await trio.sleep(_ACCEPT_PAUSE / 2)
    server.stop_accepting()  # must not raise
    with trio.fail_after(1):
        await server.drained()
    await trio.sleep(_ACCEPT_PAUSE * 4)
    assert listener.accepts == 1  # the pause's end did not start accepting again
    nursery.cancel_scope.cancel()
    listener.close()


async def test_a_bug_in_accept_pauses_without_ending_the_server(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, tmp_path: Path
) -> None:
    listener = FakeListener(RuntimeError("a bug"))
    server = _server(tmp_path)
    await nursery.start(server.serve, listener)
    await trio.sleep(_ACCEPT_PAUSE * 2.5)
    assert listener.accepts == 3  # the reactor lives on, pausing between attempts
    nursery.cancel_scope.cancel()
    listener.close()
