"""The session manager against the emulator under MockClock: single flight, proactive
and on-demand refresh, lifetimes, eviction, rate limits, apps kept apart, restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from broker.core.clock import TrioWallClock
from broker.core.errors import (
    InvalidCredentials,
    RateLimited,
    Relayed,
    StoreError,
    UnknownSession,
)
from broker.core.secret import Secret
from broker.customers.model.handles import new_handle
from broker.customers.model.lifetime import Lifetime
from broker.customers.model.ratelimit import LoginRates, Rate
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from tests.customers.conftest import Start
from tests.support import fill, refreshes, remount

PASSWORD = Secret(DEMO_PASSWORD)
#: A session idle after a minute: refreshed only at its next use.
IDLE_SOON = Lifetime(active_for=60.0, max_per_customer=100)
MANY = LoginRates(per_username=Rate(1.0, 100), per_uid=Rate(1.0, 100))


async def test_ssr_fan_out_at_bearer_expiry_makes_one_refresh(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=IDLE_SOON)
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(900)  # the bearer has just expired; the session was idle
    assert refreshes(emulator) == 0
    served: list[str] = []

    async def page_part() -> None:
        answer = await manager.token("shop", created.handle)
        served.append(answer.token.reveal())

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(page_part)
    assert refreshes(emulator) == 1
    assert len(served) == 50 and len(set(served)) == 1


async def test_a_waiter_going_away_does_not_cancel_the_refresh(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=IDLE_SOON)
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    live = manager.lives.peek(manager.store.store_key.session_id("shop", created.handle))
    assert live is not None
    await trio.sleep(900)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.token, "shop", created.handle)
        while live.flight is None:
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()  # the only caller goes away mid-refresh
    await trio.sleep(1)
    assert refreshes(emulator) == 1
    assert live.generation == 2  # the rotated token was committed all the same
    await manager.token("shop", created.handle)
    assert refreshes(emulator) == 1


async def test_refreshes_in_flight_per_app_are_bounded(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=IDLE_SOON, max_refreshes=2, rates=MANY)
    handles = [
        (await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)).handle
        for _ in range(8)
    ]
    await trio.sleep(900)
    emulator.server.faults.add(Fault("latency", match="GET /api", seconds=1.0))
    emulator.server.peak_in_flight = 0
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for handle in handles:
            nursery.start_soon(manager.token, "shop", handle)
    assert refreshes(emulator) == 8
    assert emulator.server.peak_in_flight == 2
    assert trio.current_time() - started == 4.0  # eight 1-s refreshes, two at a time


async def test_a_session_in_use_is_refreshed_ahead_of_expiry(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers()
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    first = await manager.token("shop", created.handle)
    start = trio.current_time()
    await trio.sleep(674)
    assert refreshes(emulator) == 0
    await trio.sleep(2)  # 0.75 of the 900-s bearer: 675 s
    assert refreshes(emulator) == 1
    second = await manager.token("shop", created.handle)
    assert second.expires_at == first.expires_at + 675
    assert trio.current_time() - start == 676


async def test_an_idle_session_costs_geins_nothing_until_used(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=Lifetime(active_for=60.0, idle_remembered=86400))
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(5 * 3600)
    assert refreshes(emulator) == 0
    await manager.token("shop", created.handle)
    assert refreshes(emulator) == 1


async def test_idle_end_logs_out_at_geins(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=Lifetime(idle_short=600.0, active_for=60.0))
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=False)
    await trio.sleep(599)
    await manager.token("shop", created.handle)  # used: the idle end moves on
    await trio.sleep(599)
    await manager.token("shop", created.handle)
    await trio.sleep(600)
    with pytest.raises(UnknownSession):
        await manager.token("shop", created.handle)
    await trio.sleep(1)  # the purge worker logs it out
    assert emulator.service.counts["GET /logout"] == 1
    assert emulator.service.live_sessions(DEMO_USER) == 0
    assert manager.stats.ends["shop", "idle"] == 1
    assert await manager.store.count("shop") == 0


async def test_sweep_ends_idle_sessions_nobody_asks_for(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=Lifetime(idle_short=600.0, active_for=60.0))
    await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=False)
    await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(700)  # the sweeper runs every 60 s
    assert await manager.store.count("shop") == 1
    assert manager.stats.ends["shop", "idle"] == 1
    assert emulator.service.counts["GET /logout"] == 1


async def test_absolute_end_from_geins_max_age(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    # Not remembered: Geins gives a 30-minute session (sessionLifetime 30); idle for
    # longer than that is allowed here, so the absolute end is what ends it.
    manager = await start_customers(lifetime=Lifetime(idle_short=7200.0, active_for=60.0))
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=False)
    info = await manager.info("shop", created.handle)
    assert info.session_ends_at == created.session_ends_at
    assert created.session_ends_at - created.expires_at == 1800 - 900
    await trio.sleep(1800)
    with pytest.raises(UnknownSession):
        await manager.token("shop", created.handle)
    assert manager.stats.ends["shop", "absolute"] == 1


async def test_eviction_per_customer_and_per_app_is_least_recently_used(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    emulator.service.add_user("b@example.com", "b-password")
    manager = await start_customers(lifetime=Lifetime(max_per_customer=2, max_sessions=3))
    one = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(1)
    two = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(1)
    await manager.token("shop", one.handle)  # one is now the more recently used
    await trio.sleep(1)
    three = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    with pytest.raises(UnknownSession):
        await manager.token("shop", two.handle)
    await manager.token("shop", three.handle)
    await trio.sleep(1)
    await manager.token("shop", one.handle)
    await trio.sleep(1)
    b = await manager.login("shop", 1000, "b@example.com", Secret("b-password"), remember=True)
    assert await manager.store.count("shop") == 3
    await trio.sleep(1)
    await manager.login("shop", 1000, "b@example.com", Secret("b-password"), remember=True)
    # The app is full: the least recently used of all (three, by the use in memory
    # that the store has not been told of yet) makes room.
    with pytest.raises(UnknownSession):
        await manager.token("shop", three.handle)
    await manager.token("shop", b.handle)
    assert manager.stats.ends["shop", "evicted"] == 2
    await trio.sleep(1)
    assert emulator.service.counts["GET /logout"] == 2


async def test_login_attempts_are_rate_limited_per_username_and_per_uid(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    rates = LoginRates(per_username=Rate(1 / 60, 2), per_uid=Rate(1 / 60, 3))
    manager = await start_customers(rates=rates)
    for _ in range(2):
        with pytest.raises(InvalidCredentials):
            await manager.login("shop", 1000, DEMO_USER, Secret("wrong"), remember=False)
    challenges = emulator.service.counts["POST /login"]
    with pytest.raises(RateLimited) as refused:
        await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=False)
    assert refused.value.retry_after == pytest.approx(60.0)
    assert emulator.service.counts["POST /login"] == challenges  # Geins never asked
    # Another username from the same uid: the uid's third attempt still goes ahead...
    with pytest.raises(InvalidCredentials):
        await manager.login("shop", 1000, "x@example.com", Secret("x"), remember=False)
    # ...its fourth does not, and another uid's does.
    with pytest.raises(RateLimited):
        await manager.login("shop", 1000, "y@example.com", Secret("y"), remember=False)
    with pytest.raises(InvalidCredentials):
        await manager.login("shop", 2000, "y@example.com", Secret("y"), remember=False)
    await trio.sleep(60)
    await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=False)
    assert manager.stats.rate_limited["shop"] == 2


async def test_another_apps_handle_answers_like_an_unknown_one(
    autojump_clock: trio.testing.MockClock, start_customers: Start
) -> None:
    manager = await start_customers(apps=("shop", "outlet"))
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    errors = []
    for app, handle in (("outlet", created.handle), ("shop", new_handle()), ("shop", Secret("x"))):
        with pytest.raises(UnknownSession) as refused:
            await manager.token(app, handle)
        errors.append((refused.value.code, str(refused.value)))
    assert len(set(errors)) == 1
    await manager.token("shop", created.handle)


async def test_logout_ends_the_session_at_geins_and_here(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers()
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    assert emulator.service.live_sessions(DEMO_USER) == 1
    await manager.logout("shop", created.handle)
    assert emulator.service.live_sessions(DEMO_USER) == 0
    with pytest.raises(UnknownSession):
        await manager.info("shop", created.handle)
    assert await manager.store.count("shop") == 0


async def test_logout_during_a_refresh_is_not_undone(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=IDLE_SOON)
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(900)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.token, "shop", created.handle)
        await trio.testing.wait_all_tasks_blocked()
        await manager.logout("shop", created.handle)
        nursery.cancel_scope.cancel()
    assert emulator.service.live_sessions(DEMO_USER) == 0
    assert await manager.store.count("shop") == 0
    with pytest.raises(UnknownSession):
        await manager.token("shop", created.handle)


async def test_a_read_of_a_session_that_ends_meanwhile_brings_nothing_back(
    autojump_clock: trio.testing.MockClock, start_customers: Start
) -> None:
    """A session not in memory is being loaded (its row read, slowly) when it is ended
    and its deletion committed: the row the load read is not let back into memory, and
    the handle opens nothing from then on."""
    manager = await start_customers()
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    session_id = manager.store.store_key.session_id("shop", created.handle)
    assert manager.lives.pop(session_id) is not None  # dropped, as the LRU map does
    read = manager.store.get

    async def slow_read(app: str, wanted: bytes) -> object:
        row = await read(app, wanted)
        await trio.sleep(1.0)  # the answer comes back after the deletion's commit
        return row

    manager.store.get = slow_read  # type: ignore[method-assign,assignment]
    async with trio.open_nursery() as nursery:

        async def use() -> None:
            with pytest.raises(UnknownSession):
                await manager.token("shop", created.handle)

        nursery.start_soon(use)
        await trio.sleep(0.5)
        assert await manager.end_customer("shop", DEMO_USER) == 1
    manager.store.get = read  # type: ignore[method-assign]
    assert manager.lives.peek(session_id) is None
    with pytest.raises(UnknownSession):
        await manager.token("shop", created.handle)


async def test_log_out_everywhere_and_listing(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers()
    handles = [
        (await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)).handle
        for _ in range(3)
    ]
    listed = await manager.sessions("shop", DEMO_USER)
    assert [s.username for s in listed] == [DEMO_USER] * 3
    assert all(len(s.session) == 8 for s in listed)
    assert not any(h.reveal() in repr(listed) for h in handles)
    assert await manager.end_customer("shop", DEMO_USER.upper()) == 3
    await trio.sleep(1)
    assert emulator.service.live_sessions(DEMO_USER) == 0
    assert await manager.sessions("shop") == []


async def test_a_rotation_by_another_node_is_adopted(
    autojump_clock: trio.testing.MockClock,
    emulator: Emulator,
    start_customers: Start,
    short_tmp: Path,
) -> None:
    """Two managers on one store file: each a node. B's refresh token is spent by A's
    rotation; B adopts A's generation from the store instead of ending the session."""
    path = short_tmp / "shared.sqlite"
    a = await start_customers(path=path, lifetime=IDLE_SOON)
    b = await start_customers(path=path, lifetime=IDLE_SOON)
    created = await a.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await b.token("shop", created.handle)  # B holds generation 1
    await trio.sleep(10)
    newer = await a.token("shop", created.handle, min_valid=895)  # A rotates
    assert refreshes(emulator) == 1
    adopted = await b.token("shop", created.handle, min_valid=895)
    assert adopted.token == newer.token
    assert refreshes(emulator) == 2  # B's one attempt, refused; nothing ended
    assert b.stats.refreshes["shop", "adopted"] == 1
    assert await a.store.count("shop") == 1


async def test_a_revoked_session_ends(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers(lifetime=IDLE_SOON)
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    emulator.service.revoke_user(DEMO_USER)
    await trio.sleep(900)
    with pytest.raises(Relayed) as refused:
        await manager.token("shop", created.handle)
    assert refused.value.code == "login_required"
    with pytest.raises(UnknownSession):
        await manager.token("shop", created.handle)
    assert manager.stats.ends["shop", "revoked"] == 1


async def test_restart_serves_from_the_store_without_refreshing(
    autojump_clock: trio.testing.MockClock,
    emulator: Emulator,
    start_customers: Start,
    nursery: trio.Nursery,
) -> None:
    first = await start_customers()
    created = await first.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    served = await first.token("shop", created.handle)
    second = await start_customers()  # the same file, a fresh daemon
    assert len(second.lives) == 0
    await trio.sleep(30)
    assert refreshes(emulator) == 0
    again = await second.token("shop", created.handle)
    assert again.token == served.token
    assert refreshes(emulator) == 0


async def test_password_change_keeps_the_session(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    manager = await start_customers()
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    before = await manager.token("shop", created.handle)
    await trio.sleep(5)
    await manager.passwd("shop", 1000, created.handle, PASSWORD, Secret("new-password"))
    after = await manager.token("shop", created.handle)
    assert after.token != before.token
    info = await manager.info("shop", created.handle)
    assert info.username == DEMO_USER and info.customer_type == "PERSON"


async def test_a_store_that_cannot_write_costs_geins_one_refresh_not_one_per_request(
    autojump_clock: trio.testing.MockClock,
    emulator: Emulator,
    start_customers: Start,
    tmpfs: Path,
    wall: TrioWallClock,
) -> None:
    """The store's file system fills up as a refresh falls due: the rotated
    tokens cannot be committed, so the bearer is not served. Each request after that
    tries to commit the tokens already held again; it does not ask Geins for new ones
    (a request per token would otherwise be a refresh per token). Once the store
    writes again, the held bearer is served."""
    remount(tmpfs, "size=1m")  # room for the database, its WAL and its shared memory
    manager = await start_customers(path=tmpfs / "customers.sqlite", lifetime=IDLE_SOON)
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(900)  # idle: its refresh waits for its next use
    before = refreshes(emulator)
    filler = fill(tmpfs)
    try:
        for _ in range(5):
            with pytest.raises(Relayed) as refused:
                await manager.token("shop", created.handle)
            assert refused.value.code == StoreError.code
    finally:
        filler.unlink()
    assert refreshes(emulator) - before == 1
    served = await manager.token("shop", created.handle)
    assert refreshes(emulator) - before == 1
    assert served.expires_at > wall.now() + 800  # the rotated bearer, not the old one


async def test_a_login_the_store_cannot_keep_is_logged_out_at_geins(
    autojump_clock: trio.testing.MockClock,
    emulator: Emulator,
    start_customers: Start,
    tmpfs: Path,
) -> None:
    """Geins made the session, the store could not commit it: the caller gets the
    store's error and no handle, and the session is logged out at Geins rather than
    left alive there, unreachable, until its maxAge."""
    remount(tmpfs, "size=1m")
    manager = await start_customers(path=tmpfs / "customers.sqlite")
    filler = fill(tmpfs)
    try:
        with pytest.raises(StoreError):
            await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    finally:
        filler.unlink()
    await trio.sleep(1)  # the logout is sent in the background
    assert emulator.service.live_sessions(DEMO_USER) == 0


async def test_a_proactive_rotation_is_committed_the_moment_geins_answers(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    """Geins spent the old refresh token when it answered: the new one goes to disk at
    once (a crash before the commit would lose the session), even for a refresh nobody
    waits on."""
    manager = await start_customers()
    start = trio.current_time()
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    assert trio.current_time() == start  # the login's commit went at once too
    session_id = manager.store.store_key.session_id("shop", created.handle)
    before = await manager.store.get("shop", session_id)
    assert before is not None
    await trio.sleep(675 + 0.01)  # the rotation point, and a hundredth of a second
    assert refreshes(emulator) == 1
    after = await manager.store.get("shop", session_id)
    assert after is not None and after.record != before.record
    assert manager.store.stats.commits == 2  # the login's and the rotation's


async def test_proactive_refreshes_due_within_a_tick_start_together(
    autojump_clock: trio.testing.MockClock, emulator: Emulator, start_customers: Start
) -> None:
    """Sessions whose rotation points are within `START_TICK` of the first are
    refreshed with it, so their commits reach the store together and share its groups
    (scripts/bench sessions counts the fsyncs); one due later waits for its own time."""
    manager = await start_customers()
    assert manager.refresher.start_tick == 0.25
    start = trio.current_time()
    for offset in (0.0, 0.1, 0.2, 0.4):  # due at 675.0, 675.1, 675.2 and 675.4
        await trio.sleep(offset - (trio.current_time() - start))
        await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    await trio.sleep(start + 675 - trio.current_time())
    await trio.sleep(0.01)
    assert refreshes(emulator) == 3
    await trio.sleep(0.38)  # 675.39
    assert refreshes(emulator) == 3
    await trio.sleep(0.02)  # 675.41
    assert refreshes(emulator) == 4


async def test_the_hot_path_answers_only_a_live_session_of_its_own_app(
    autojump_clock: trio.testing.MockClock, wall: TrioWallClock, start_customers: Start
) -> None:
    manager = await start_customers(apps=("shop", "other"), lifetime=Lifetime(idle_short=60.0))
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=False)
    handle = created.handle.reveal()

    def token_frame(app: str, handle: str) -> bytes | None:
        return manager.token_frame(1, app, handle, 0, wall.now())

    assert token_frame("shop", handle) is not None
    assert token_frame("other", handle) is None  # the long way refuses it
    await trio.sleep(59.5)
    assert token_frame("shop", handle) is not None  # a use: idle from now
    await trio.sleep(59.5)
    assert token_frame("shop", handle) is not None
    await trio.sleep(60)
    assert token_frame("shop", handle) is None  # idle: the long way ends it
    with pytest.raises(UnknownSession):
        await manager.token("shop", created.handle)


async def test_a_session_dropped_from_memory_is_answered_the_long_way(
    autojump_clock: trio.testing.MockClock, wall: TrioWallClock, start_customers: Start
) -> None:
    """Beyond `live_capacity` the least recently used session leaves memory (it waits,
    sealed, in the store); the hot path no longer answers its handle, the long way loads
    it again."""
    manager = await start_customers()
    manager.lives.capacity = 2
    handles = []
    for _ in range(3):
        created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
        handles.append(created.handle)
        await trio.sleep(1)
    assert len(manager.lives) == 2
    assert manager.token_frame(1, "shop", handles[0].reveal(), 0, wall.now()) is None
    assert manager.token_frame(1, "shop", handles[2].reveal(), 0, wall.now()) is not None
    served = await manager.token("shop", handles[0])  # loaded again; the oldest goes
    assert served.token.reveal()
    assert manager.token_frame(1, "shop", handles[0].reveal(), 0, wall.now()) is not None
    assert manager.token_frame(1, "shop", handles[1].reveal(), 0, wall.now()) is None


async def test_a_session_another_node_ended_is_not_answered_from_memory(
    autojump_clock: trio.testing.MockClock, wall: TrioWallClock, start_customers: Start
) -> None:
    """The store reports a session ended elsewhere (fleet mode's watch): it leaves
    memory, and the hot path, which finds sessions by handle without `lives`, no
    longer answers it; the long way asks the store again."""
    manager = await start_customers()
    created = await manager.login("shop", 1000, DEMO_USER, PASSWORD, remember=True)
    handle = created.handle.reveal()
    assert manager.token_frame(1, "shop", handle, 0, wall.now()) is not None
    manager._dropped("shop", manager.store.store_key.session_id("shop", created.handle))
    assert manager.token_frame(1, "shop", handle, 0, wall.now()) is None
    assert (await manager.token("shop", created.handle)).token.reveal()  # still stored here
    assert manager.token_frame(1, "shop", handle, 0, wall.now()) is not None
