"""SIGHUP's reload, in-process: profiles leave and come back with their sessions, limits
follow, and a reader whose access was taken away is refused on an open connection."""

from __future__ import annotations

import functools
import random
import socket
from pathlib import Path

import trio
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.daemon.config import load
from broker.daemon.lifecycle import Daemon
from broker.emulator.app import Emulator
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from broker.rpc.connection import Connection
from broker.rpc.peercred import Peer
from geins_broker_client.protocol import FrameDecoder
from geins_broker_client.trio_client import TrioClient
from tests.support import inline, write_config


async def test_a_profile_removed_and_restored_keeps_its_session(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    sock, state = short_tmp / "b.sock", short_tmp / "state"
    config = write_config(short_tmp / "c.toml", emulator.url, sock, state, profiles=("a", "b"))
    daemon = Daemon(load(config), wall=wall, rng=random.Random(1), offload=inline)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    async with TrioClient(sock) as client:
        await client.login(DEMO_USER, DEMO_PASSWORD, profile="a", remember=True)
        token = await client.token(profile="a")
        logins = emulator.service.counts["POST /login"]

        write_config(
            config, emulator.url, sock, state, profiles=("b",), broker={"max_connections": 7}
        )
        await daemon.reload()
        assert [p.profile for p in (await client.status()).profiles] == ["b"]
        assert daemon.server is not None and daemon.server.limits.max_connections == 7

        await trio.sleep(3600)  # a removed profile does not rotate
        write_config(config, emulator.url, sock, state, profiles=("a", "b"))
        await daemon.reload()
        again = await client.token(profile="a")  # the session came back with the profile
        assert emulator.service.counts["POST /login"] == logins
        assert again.profile == "a"
        await trio.sleep(1)
        assert daemon.profiles["a"].session.refreshes >= 1  # and it rotates again
        assert (await client.token(profile="a")).token != token.token


async def test_an_open_connection_loses_access_taken_away_by_a_reload(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    sock, state = short_tmp / "b.sock", short_tmp / "state"
    config = write_config(
        short_tmp / "c.toml", emulator.url, sock, state, profile={"allow_users": [4242]}
    )
    daemon = Daemon(load(config), wall=wall, rng=random.Random(1), offload=inline)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    async with TrioClient(sock) as admin:
        await admin.login(DEMO_USER, DEMO_PASSWORD)
    server = daemon.server
    assert server is not None
    left, right = socket.socketpair()
    reader = Connection(left, Peer(pid=1, uid=4242, gid=4242), trio.current_time())

    def ask() -> dict[str, object]:
        frame = server.requests.dispatch(reader, {"id": 1, "op": "token"})
        assert frame is not None
        return FrameDecoder(10**6).feed(frame)[0]

    assert ask()["ok"] is True
    write_config(config, emulator.url, sock, state, profile={"allow_users": []})
    await daemon.reload()
    answer = ask()
    assert answer["ok"] is False
    assert answer["error"]["code"] == "forbidden"  # type: ignore[index]
    left.close()
    right.close()


async def test_a_profile_a_reload_adds_takes_the_new_settings(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """A reload that adds a profile and changes `token_wait` gives the new profile the
    new wait, as it gives the profiles that stay."""
    sock, state = short_tmp / "b.sock", short_tmp / "state"
    config = write_config(short_tmp / "c.toml", emulator.url, sock, state, profiles=("a",))
    daemon = Daemon(load(config), wall=wall, rng=random.Random(1), offload=inline)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    write_config(config, emulator.url, sock, state, profiles=("a", "b"), broker={"token_wait": 3})
    await daemon.reload()
    assert {name: p.token_wait for name, p in daemon.profiles.items()} == {"a": 3.0, "b": 3.0}
    daemon.stop()
