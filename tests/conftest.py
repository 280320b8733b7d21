"""Shared fixtures: a virtual wall clock, the emulator on loopback, short socket paths."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from broker.emulator import Emulator
from broker.wallclock import TrioWallClock


@pytest.fixture
async def wall(autojump_clock: trio.testing.MockClock) -> TrioWallClock:
    """Wall time driven by the autojumping MockClock; `wall.step(s)` mimics a clock jump.

    pytest-trio hands a clock to trio.run only when the test function itself asks for
    it, so a test using `wall` must also take `autojump_clock`; this guard says so.
    """
    assert isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock), (
        "a test that uses `wall` must take the `autojump_clock` fixture as an argument"
    )
    return TrioWallClock()


@pytest.fixture
async def emulator(wall: TrioWallClock, nursery: trio.Nursery) -> Emulator:
    emu = Emulator(clock=wall.now, token_ttl=900.0)
    await emu.start(nursery)
    return emu


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: a Unix socket path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="gb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's own config, socket or state."""
    for name in (
        "GEINS_BROKER_CONFIG",
        "GEINS_BROKER_SOCKET",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "WATCHDOG_USEC",
        "RUNTIME_DIRECTORY",
        "STATE_DIRECTORY",
        "JOURNAL_STREAM",
        "INVOCATION_ID",
        "XDG_RUNTIME_DIR",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
