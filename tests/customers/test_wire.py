"""Customer sessions through the daemon: every op over its socket, against the
emulator, under MockClock (the daemon in-process; tests/hostile/test_customer_sessions.py
has the other uids and the real processes)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
import trio.testing

from broker.core.clock import TrioWallClock
from broker.core.errors import BrokerFault
from broker.daemon.config import load
from broker.emulator.app import Emulator
from broker.rpc.peercred import Peer
from geins_broker_client.errors import (
    Forbidden,
    InvalidCredentials,
    RateLimited,
    UnknownApp,
    UnknownSession,
)
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    Broker,
    RawConnection,
    Scrape,
    start_broker,
    write_config,
)

SHOP: dict[str, object] = {"jitter": 0}


async def shop_broker(
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    tmp: Path,
    apps: Mapping[str, Mapping[str, object]] | None = None,
) -> Broker:
    return await start_broker(
        nursery, emulator, wall, tmp, apps=apps or {"shop": SHOP, "outlet": SHOP}
    )


@pytest.fixture
async def broker(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> Broker:
    """This module's daemon: apps `shop` and `outlet`, no jitter."""
    return await shop_broker(nursery, emulator, wall, short_tmp)


async def test_every_session_op_through_the_daemon(
    autojump_clock: trio.testing.MockClock,
    wall: TrioWallClock,
    broker: Broker,
) -> None:
    async with broker.client() as client:
        created = await client.session_login("shop", DEMO_USER, DEMO_PASSWORD, remember=True)
        assert (created.app, created.username, created.remember) == ("shop", DEMO_USER, True)
        assert len(created.handle) == 43
        assert created.handle not in repr(created)
        assert created.expires_at == wall.now() + 900
        handle = created.handle

        token = await client.session_token("shop", handle, min_valid=60)
        assert token.expires_at == created.expires_at
        assert token.token not in repr(token)
        info = await client.session_info("shop", handle)
        assert (info.username, info.customer_type, info.remember) == (DEMO_USER, "PERSON", True)
        assert info.session_ends_at == created.session_ends_at

        await trio.sleep(10)
        expires_at = await client.session_passwd("shop", handle, DEMO_PASSWORD, "n3w-pass")
        assert expires_at == wall.now() + 900
        assert (await client.session_token("shop", handle)).expires_at == expires_at

        registered = await client.session_register("shop", "new@example.com", "pw-1234")
        listed = await client.sessions("shop")
        assert sorted(s.username or "" for s in listed) == sorted([DEMO_USER, "new@example.com"])
        assert all(len(s.session) == 8 and s.session not in handle for s in listed)
        mine = await client.sessions("shop", username="NEW@example.com")
        assert [s.username for s in mine] == ["new@example.com"]
        assert await client.session_end("shop", "new@example.com") == 1
        with pytest.raises(UnknownSession):
            await client.session_token("shop", registered.handle)

        await client.session_logout("shop", handle)
        with pytest.raises(UnknownSession):
            await client.session_token("shop", handle)
        with pytest.raises(UnknownSession):
            await client.session_info("shop", handle)
        with pytest.raises(InvalidCredentials):
            await client.session_login("shop", DEMO_USER, "wrong")
        with pytest.raises(UnknownApp):
            await client.session_login("nowhere", DEMO_USER, DEMO_PASSWORD)


async def test_a_handle_of_one_app_is_an_unknown_session_in_another(
    autojump_clock: trio.testing.MockClock,
    broker: Broker,
) -> None:
    async with broker.client() as client:
        created = await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)
        for op in (client.session_token, client.session_info, client.session_logout):
            with pytest.raises(UnknownSession) as theirs:
                await op("outlet", created.handle)
            with pytest.raises(UnknownSession) as nobodys:
                await op("outlet", "A" * 43)
            assert theirs.value.message == nobodys.value.message
        # Still the shop's, untouched by the attempts.
        assert (await client.session_token("shop", created.handle)).expires_at


async def test_session_token_is_answered_from_memory_without_a_task(
    autojump_clock: trio.testing.MockClock,
    wall: TrioWallClock,
    broker: Broker,
) -> None:
    async with broker.client() as client:
        handle = (await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)).handle
    waited = broker.daemon.telemetry.stats.server.waited
    before = waited.values.get(("session_token",), 0)
    conn = await RawConnection.open(broker.socket)
    try:
        for request_id in range(1, 101):
            await conn.request(id=request_id, op="session_token", app="shop", handle=handle)
        answers = [await conn.receive() for _ in range(100)]
    finally:
        conn.close()
    assert all(
        a is not None and a["ok"] and set(a) == {"id", "ok", "token", "expires_at"} for a in answers
    )
    assert waited.values.get(("session_token",), 0) == before  # no task for any of them
    # A bearer that cannot serve min_valid goes the long way: one refresh.
    await trio.sleep(10)
    conn = await RawConnection.open(broker.socket)
    try:
        answer = await conn.call(id=1, op="session_token", app="shop", handle=handle, min_valid=899)
    finally:
        conn.close()
    assert answer["ok"] and answer["expires_at"] == wall.now() + 900
    assert waited.values.get(("session_token",), 0) == before + 1


async def test_logins_are_rate_limited_over_the_wire(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    apps = {"shop": {**SHOP, "login_burst_per_username": 2, "login_interval_per_username": 30}}
    broker = await shop_broker(nursery, emulator, wall, short_tmp, apps)
    async with broker.client() as client:
        await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)
        with pytest.raises(InvalidCredentials):
            await client.session_login("shop", DEMO_USER, "guess")
        upstream = dict(emulator.service.counts)
        with pytest.raises(RateLimited) as refused:
            await client.session_login("shop", DEMO_USER, "another guess")
        assert refused.value.retry_after == 30.0
        assert dict(emulator.service.counts) == upstream  # the third never left
        await trio.sleep(30)
        await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)
    scrape = Scrape((await broker.daemon.telemetry.metrics_text())[0])
    assert scrape("geins_broker_customer_rate_limited_total", app="shop") == 1
    assert scrape("geins_broker_customer_logins_total", app="shop", result="ok") == 2
    assert scrape("geins_broker_customer_logins_total", app="shop", result="invalid_credentials")


async def test_status_and_metrics_count_sessions_per_app(
    autojump_clock: trio.testing.MockClock,
    broker: Broker,
) -> None:
    async with broker.client() as client:
        handles = [
            (await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)).handle for _ in range(3)
        ]
        await client.session_login("outlet", DEMO_USER, DEMO_PASSWORD)
        await client.session_logout("shop", handles[0])
        status = await client.status()
    counts = {a.app: (a.sessions, a.in_memory) for a in status.apps}
    assert counts == {"shop": (2, 2), "outlet": (1, 1)}
    scrape = Scrape((await broker.daemon.telemetry.metrics_text())[0])
    assert scrape("geins_broker_customer_sessions", app="shop", where="store") == 2
    assert scrape("geins_broker_customer_session_ends_total", app="shop", reason="logout") == 1
    assert scrape("geins_broker_customer_store_commit_seconds_count") >= 5
    assert scrape("geins_broker_customer_store_bytes") > 0


async def test_a_profile_without_apps_opens_no_store_and_refuses_session_ops(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(nursery, emulator, wall, short_tmp)
    assert broker.daemon.customers is None
    assert not (broker.state_dir / "customers.sqlite").exists()
    async with broker.client() as client:
        with pytest.raises(UnknownApp):
            await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)
        assert (await client.status()).apps == ()


async def test_a_reload_changes_who_may_use_an_app_and_removes_one(
    autojump_clock: trio.testing.MockClock,
    emulator: Emulator,
    broker: Broker,
) -> None:
    daemon = broker.daemon
    running = daemon.config.apps["shop"]
    async with broker.client() as client:
        handle = (await client.session_login("outlet", DEMO_USER, DEMO_PASSWORD)).handle
    apps: dict[str, dict[str, object]] = {
        "shop": {**SHOP, "allow_users": [4242], "idle_short": 60},
        "added": SHOP,
    }
    source = write_config(
        broker.state_dir / "config.toml", emulator.url, broker.socket, broker.state_dir, apps=apps
    )
    assert daemon.config.source == source
    assert daemon.roster.restart_warnings(load(source)) == ["apps.shop", "apps.added"]
    await daemon.reload()
    kept = daemon.server.api.session_ops.apps  # type: ignore[union-attr]
    assert set(kept) == {"shop"}
    assert kept["shop"].allow_uids == {4242}
    assert kept["shop"].settings == running.settings  # the running settings until a restart
    async with broker.client() as client:
        with pytest.raises(UnknownApp):
            await client.session_token("outlet", handle)
        with pytest.raises(UnknownApp):
            await client.session_login("added", DEMO_USER, DEMO_PASSWORD)
        assert (await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)).app == "shop"


async def test_an_apps_users_may_not_list_or_end_sessions(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """In-process the caller is root; ask the ops object as the app's user would."""
    broker = await shop_broker(
        nursery, emulator, wall, short_tmp, {"shop": {"allow_users": [4242]}}
    )
    ops = broker.daemon.server.api.session_ops  # type: ignore[union-attr]
    user = Peer(uid=4242, gid=4242, pid=1, groups=frozenset())
    stranger = Peer(uid=4343, gid=4343, pid=1, groups=frozenset())
    with pytest.raises(BrokerFault) as refused:
        await ops.sessions(user, {"app": "shop", "username": None})
    assert refused.value.code == Forbidden.code
    with pytest.raises(BrokerFault) as refused:
        await ops.end(user, {"app": "shop", "username": DEMO_USER})
    assert refused.value.code == Forbidden.code
    with pytest.raises(BrokerFault) as refused:
        ops.usable(stranger, "shop")
    assert refused.value.code == Forbidden.code
    assert ops.usable(user, "shop") is broker.daemon.customers


async def test_the_hot_path_serves_no_session_past_its_idle_end(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """The bearer still has 14 minutes; the session's idle end (60 s) has passed."""
    apps = {"shop": {**SHOP, "idle_short": 60, "active_for": 30}}
    broker = await shop_broker(nursery, emulator, wall, short_tmp, apps)
    async with broker.client() as client:
        handle = (await client.session_login("shop", DEMO_USER, DEMO_PASSWORD)).handle
        await trio.sleep(59)
        assert await client.session_token("shop", handle)  # used: idle from now on
        await trio.sleep(60)
        with pytest.raises(UnknownSession):
            await client.session_token("shop", handle)
    assert broker.daemon.customers is not None
    assert broker.daemon.customers.stats.ends["shop", "idle"] == 1
