"""The Python client library: blocking, trio and asyncio flavours, cache, httpx Auth.

Against a real daemon process (and the emulator), except where a tiny fake server
makes a failure easy to stage (a daemon that never answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from geins_broker_client import (
    AsyncioClient,
    BrokerAuth,
    BrokerNotRunning,
    Client,
    NotLoggedIn,
    SessionAuth,
    SessionInfo,
    Token,
    TokenCache,
    TrioClient,
    Unavailable,
    UnknownSession,
    find_socket,
)
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    DaemonProcess,
    EmulatorProcess,
    loaded_in_fresh_interpreter,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]


class Running:
    def __init__(
        self, emulator: EmulatorProcess, config: Path, workdir: Path, socket_path: Path
    ) -> None:
        self.emulator, self.config, self.workdir, self.socket = (
            emulator,
            config,
            workdir,
            socket_path,
        )
        self.daemon = DaemonProcess(config, workdir)

    def restart(self) -> None:
        assert self.daemon.stop() == 0
        self.daemon = DaemonProcess(self.config, self.workdir)


@pytest.fixture
def running(short_tmp: Path) -> Iterator[Running]:
    emulator = EmulatorProcess("--token-ttl", "3")
    sock = short_tmp / "b.sock"
    config = write_config(short_tmp / "c.toml", emulator.url, sock, short_tmp / "state")
    setup = Running(emulator, config, short_tmp, sock)
    try:
        with Client(sock) as client:
            client.login(DEMO_USER, DEMO_PASSWORD)
        yield setup
    finally:
        setup.daemon.stop()
        emulator.stop()


def test_importing_the_client_pulls_in_nothing_heavy() -> None:
    heavy = ("trio", "httpx", "asyncio", "broker", "platformdirs", "h11", "anyio")
    assert loaded_in_fresh_interpreter("import geins_broker_client", heavy) == []


def test_the_client_installs_on_its_own_with_only_msgpack(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--target",
            str(target),
            str(REPO / "clients" / "python"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    installed = sorted(
        p.name.split("-")[0] for p in target.iterdir() if p.name.endswith(".dist-info")
    )
    assert installed == ["geins_broker_client", "msgpack"]
    probe = f"import sys; sys.path[:0] = [{str(target)!r}]; import geins_broker_client as c; print(c.Client.__name__)"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "Client"


def test_blocking_client(running: Running) -> None:
    with Client(running.socket) as client:
        token = client.token()
        assert token.expires_in() > 0
        assert token.token.count(".") == 2
        assert token.token not in repr(token)
        assert client.hello().version == 1
        assert client.user().username == DEMO_USER
        assert client.status().profiles[0].state == "active"
        client.logout()
        with pytest.raises(NotLoggedIn):
            client.token()
        client.login(DEMO_USER, DEMO_PASSWORD)


def test_blocking_client_rides_through_a_restart(running: Running) -> None:
    with Client(running.socket) as client:
        before = client.token()
        running.restart()
        assert client.token().profile == before.profile  # reconnected by itself


def test_blocking_watch_yields_each_rotation(running: Running) -> None:
    with Client(running.socket) as client:
        events = client.watch()
        first = next(events)
        second = next(events)  # about 2 s later (3 s tokens)
        events.close()
        assert first.token is not None and second.token is not None
        assert first.token.token != second.token.token
        assert client.token().token == second.token.token  # the client stayed usable


def test_not_running_and_timeouts(short_tmp: Path) -> None:
    with pytest.raises(BrokerNotRunning, match="no broker is listening"):
        Client(short_tmp / "absent.sock").token()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(short_tmp / "silent.sock"))
    silent.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            Client(short_tmp / "silent.sock", timeout=0.3).token()
        assert info.value.code == "timeout"
        assert 0.3 <= time.monotonic() - start < 2
    finally:
        silent.close()


def test_find_socket_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GEINS_BROKER_SOCKET", "/env.sock")
    assert find_socket("/explicit.sock") == "/explicit.sock"
    assert find_socket() == "/env.sock"
    monkeypatch.delenv("GEINS_BROKER_SOCKET")
    runtime = tmp_path / "rt"
    (runtime / "geins-broker").mkdir(parents=True)
    (runtime / "geins-broker" / "broker.sock").touch()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert find_socket() == str(runtime / "geins-broker" / "broker.sock")


def test_asyncio_client(running: Running) -> None:
    async def main() -> tuple[Token, Token, str]:
        async with AsyncioClient(running.socket) as client:
            token = await client.token()
            events = client.watch()
            await events.__anext__()
            rotated = await events.__anext__()
            await events.aclose()
            assert rotated.token is not None
            return token, rotated.token, (await client.user()).username

    token, rotated, username = asyncio.run(main())
    assert rotated.token != token.token
    assert username == DEMO_USER


async def test_trio_client(running: Running) -> None:
    async with TrioClient(running.socket) as client:
        token = await client.token(min_valid=1)
        assert token.expires_in() >= 1
        async with contextlib.aclosing(client.watch()) as events:
            async for event in events:
                assert event.event == "token"
                break
        with trio.fail_after(10):
            await trio.to_thread.run_sync(running.restart)
        assert (await client.token()).profile == "default"


class ScriptedClient(Client):
    """A stand-in daemon that hands out tokens expiring at the times given."""

    def __init__(self, *expiries: float) -> None:
        super().__init__("/unused")
        self.expiries = list(expiries)
        self.asked: list[float] = []

    def token(self, profile: str | None = None, *, min_valid: float = 0) -> Token:
        self.asked.append(min_valid)
        expires = self.expiries.pop(0)
        return Token("default", f"t{expires:g}", expires)


def test_token_cache_asks_only_when_too_little_is_left() -> None:
    now = [1000.0]
    fake = ScriptedClient(1900.0, 2800.0)
    cache = TokenCache(fake, min_valid=60, clock=lambda: now[0])
    assert cache.get().token == "t1900"
    for step in (100, 500, 239):  # 1839: still 61 s left
        now[0] = 1000.0 + step
        assert cache.get().token == "t1900"
    assert fake.asked == [60]
    now[0] = 1841.0  # 59 s left: ask again, passing min_valid on
    assert cache.get().token == "t2800"
    assert fake.asked == [60, 60]
    cache.invalidate()
    fake.expiries.append(3700.0)
    assert cache.get().token == "t3700"


def test_token_cache_is_thread_safe(running: Running) -> None:
    cache = TokenCache(Client(running.socket), min_valid=1)
    seen: list[str] = []

    def worker() -> None:
        for _ in range(200):
            seen.append(cache.get().token)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.client.close()
    assert len(seen) == 1600
    assert all(t.count(".") == 2 for t in seen)


def _api(expected: list[str], unauthorized_once: bool = False) -> httpx.MockTransport:
    state = {"refused": not unauthorized_once}

    def handler(request: httpx.Request) -> httpx.Response:
        expected.append(request.headers["Authorization"])
        if not state["refused"]:
            state["refused"] = True
            return httpx.Response(401)
        return httpx.Response(200, json={"data": {}})

    return httpx.MockTransport(handler)


def test_httpx_auth_sync(running: Running) -> None:
    sent: list[str] = []
    with Client(running.socket) as client:
        bearer = client.token().token
    auth = BrokerAuth(socket_path=str(running.socket), min_valid=1)
    with httpx.Client(transport=_api(sent, unauthorized_once=True), auth=auth) as http:
        assert http.post("https://merchantapi.geins.io/graphql", json={}).status_code == 200
    auth.close()
    assert len(sent) == 2  # refused once, retried with the token asked for again
    assert all(header.startswith("Bearer ") and header.count(".") == 2 for header in sent)
    assert bearer.split(".")[0] == sent[0].removeprefix("Bearer ").split(".")[0]


def test_httpx_auth_asyncio(running: Running) -> None:
    sent: list[str] = []

    async def main() -> int:
        auth = BrokerAuth(socket_path=str(running.socket), min_valid=1)
        async with httpx.AsyncClient(transport=_api(sent), auth=auth) as http:
            status = (await http.get("https://merchantapi.geins.io/graphql")).status_code
        await auth.aclose()
        return status

    assert asyncio.run(main()) == 200
    assert sent[0].startswith("Bearer ")


async def test_httpx_auth_trio(running: Running) -> None:
    sent: list[str] = []
    auth = BrokerAuth(socket_path=str(running.socket), min_valid=1)
    async with httpx.AsyncClient(transport=_api(sent), auth=auth) as http:
        assert (await http.get("https://merchantapi.geins.io/graphql")).status_code == 200
    await auth.aclose()
    assert sent[0].startswith("Bearer ")


# -- customer sessions ---------------------------------------------------------------------


@pytest.fixture
def shop(short_tmp: Path) -> Iterator[Path]:
    """A daemon with the app `shop`; its socket."""
    emulator = EmulatorProcess()
    sock = short_tmp / "b.sock"
    config = write_config(
        short_tmp / "c.toml", emulator.url, sock, short_tmp / "state", apps={"shop": {}}
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        yield sock
    finally:
        daemon.close()
        emulator.stop()


def test_session_ops_in_every_flavour(shop: Path) -> None:
    with Client(shop) as client:
        created = client.session_login("shop", DEMO_USER, DEMO_PASSWORD, remember=True)
        bearer = client.session_token("shop", created.handle, min_valid=60)
    assert created.handle not in repr(created) and bearer.token not in repr(bearer)

    async def from_asyncio() -> SessionInfo:
        async with AsyncioClient(shop) as client:
            assert (await client.session_token("shop", created.handle)).token == bearer.token
            return await client.session_info("shop", created.handle)

    assert asyncio.run(from_asyncio()).username == DEMO_USER

    async def from_trio() -> None:
        async with TrioClient(shop) as client:
            assert (await client.session_token("shop", created.handle)).token == bearer.token
            await client.session_logout("shop", created.handle)
            with pytest.raises(UnknownSession):
                await client.session_info("shop", created.handle)

    trio.run(from_trio)


def test_session_auth_sync_asks_again_once_on_a_401(shop: Path) -> None:
    sent: list[str] = []
    with Client(shop) as client:
        handle = client.session_login("shop", DEMO_USER, DEMO_PASSWORD).handle
        bearer = client.session_token("shop", handle).token
    auth = SessionAuth("shop", handle, socket_path=str(shop))
    assert handle not in repr(auth)
    with httpx.Client(transport=_api(sent, unauthorized_once=True), auth=auth) as http:
        assert http.post("https://merchantapi.geins.io/graphql", json={}).status_code == 200
    auth.close()
    assert sent == [f"Bearer {bearer}"] * 2  # refused once, retried with the bearer asked again


def test_session_auth_asyncio_and_trio(shop: Path) -> None:
    sent: list[str] = []
    with Client(shop) as client:
        handle = client.session_login("shop", DEMO_USER, DEMO_PASSWORD).handle

    async def get() -> int:
        auth = SessionAuth("shop", handle, socket_path=str(shop))
        async with httpx.AsyncClient(
            transport=_api(sent, unauthorized_once=True), auth=auth
        ) as http:
            status = (await http.get("https://merchantapi.geins.io/graphql")).status_code
        await auth.aclose()
        return status

    assert asyncio.run(get()) == 200
    assert trio.run(get) == 200
    assert len(sent) == 4 and len(set(sent)) == 1 and sent[0].startswith("Bearer ")
