"""Shared fixtures: a virtual wall clock, the emulator on loopback, short socket paths."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from broker import config as config_module
from broker.config import BrokerConfig
from broker.daemon import Daemon
from broker.emulator.app import Emulator
from broker.emulator.model import DEMO_PASSWORD, DEMO_USER
from broker.profile import Profile
from broker.wallclock import TrioWallClock
from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from geins_broker_client.trio_client import TrioClient


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


def fill(directory: Path) -> Path:
    """Fill the file system holding `directory`; delete the file returned to free it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def remount(mount: Path, mode: str) -> None:
    """Make a `tmpfs` read-only ("ro") or writable again ("rw")."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


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


class Broker:
    """A running daemon with its emulator, socket and state directory, for one test."""

    def __init__(self, daemon: Daemon, emulator: Emulator, socket: Path, state_dir: Path) -> None:
        self.daemon = daemon
        self.emulator = emulator
        self.socket = socket
        self.state_dir = state_dir

    def client(self, **kwargs: object) -> TrioClient:
        return TrioClient(self.socket, **kwargs)  # type: ignore[arg-type]

    def profile(self, name: str = "default") -> Profile:
        return self.daemon.profiles[name]

    async def login(self, profile: str = "default", remember: bool = False) -> None:
        async with self.client() as client:
            await client.login(DEMO_USER, DEMO_PASSWORD, profile=profile, remember=remember)


def broker_config(
    emulator: Emulator,
    socket: Path,
    state_dir: Path,
    *,
    profiles: tuple[str, ...] = ("default",),
    profile_settings: dict[str, object] | None = None,
    proxy: dict[str, object] | None = None,
    **broker_settings: object,
) -> BrokerConfig:
    endpoint = emulator.endpoint()
    data: dict[str, object] = {
        "broker": {"socket": str(socket), "state_dir": str(state_dir), **broker_settings},
        "profiles": {
            name: {
                "account": endpoint.account,
                "api_key": endpoint.api_key,
                "auth_service_url": emulator.url,
                "merchant_api_url": emulator.url,
                "channel_id": "1|se",
                "language_id": "sv-SE",
                "market_id": "se",
                **(profile_settings or {}),
            }
            for name in profiles
        },
    }
    if proxy is not None:
        data["proxy"] = proxy
    return config_module.parse(data, state_dir / "config.toml")


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Blocking calls run in place: a worker thread would let MockClock jump ahead
    while it works. The subprocess tests cover the real threads."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


async def start_broker(
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    tmp: Path,
    *,
    rng: random.Random | None = None,
    state_dir: Path | None = None,
    **settings: object,
) -> Broker:
    socket, state_dir = tmp / "broker.sock", state_dir or tmp / "state"
    config = broker_config(emulator, socket, state_dir, **settings)  # type: ignore[arg-type]
    daemon = Daemon(config, wall=wall, rng=rng or random.Random(7), offload=inline)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    return Broker(daemon, emulator, socket, state_dir)


@pytest.fixture
async def broker(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> Broker:
    return await start_broker(nursery, emulator, wall, short_tmp)


class Fraction(random.Random):
    """A random source whose `uniform(a, b)` always lands `at` of the way from a to b,
    so jitter and backoff give exact, predictable numbers."""

    def __init__(self, at: float) -> None:
        super().__init__(0)
        self.at = at

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.at


class RawConnection:
    """A client that speaks frames by hand: pipelining, bad frames, slow reading."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        self.pending: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, path: Path) -> RawConnection:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def request(self, **message: Any) -> None:
        await self.send(encode(message))

    async def receive(self) -> dict[str, Any] | None:
        """The next frame, or None at end of stream."""
        while not self.pending:
            data = await self.sock.recv(65536)
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    async def call(self, **message: Any) -> dict[str, Any]:
        await self.request(**message)
        answer = await self.receive()
        assert answer is not None
        return answer

    def close(self) -> None:
        self.sock.close()
