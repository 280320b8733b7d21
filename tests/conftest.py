"""Shared fixtures: a virtual wall clock, the emulator on loopback, short socket paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from tests.support import Broker, start_broker


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


@pytest.fixture
def tmpfs(short_tmp: Path) -> Iterator[Path]:
    """A tiny file system of our own (64 KiB): to fill up, or to make read-only.

    Mounting needs root; CI runs as root.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = short_tmp / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


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


# -- the daemon, in-process, against the in-process emulator --------------------------------


@pytest.fixture
async def broker(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> Broker:
    return await start_broker(nursery, emulator, wall, short_tmp)
