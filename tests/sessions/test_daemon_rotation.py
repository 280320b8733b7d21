"""Sessions that rotate themselves: timing, single flight, backoff, expiry, restarts.

The daemon and the emulator share one virtual wall clock driven by trio's MockClock,
so hours of rotation run in milliseconds and times are asserted exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.emulator.model.service import DEMO_USER
from broker.policy.session import State
from geins_broker_client import LoginRequired, NotLoggedIn, Unavailable
from geins_broker_client.errors import ProtocolError
from tests.support import Broker, RawConnection, exact_broker, fill, refreshes, start_broker


@pytest.fixture
async def broker(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> Broker:
    """This module's daemon: rotation and backoff at exact virtual times (no jitter)."""
    return await exact_broker(nursery, emulator, wall, short_tmp)


async def test_rotation_happens_at_three_quarters_of_the_lifetime(
    autojump_clock: MockClock,
    emulator: Emulator,
    broker: Broker,
) -> None:
    await broker.login()
    session = broker.profile().session
    logged_in_at = session.tokens.obtained_at  # type: ignore[union-attr]
    assert session.next_refresh_at == logged_in_at + 675.0
    await trio.sleep(674.9)
    assert refreshes(emulator) == 0
    await trio.sleep(0.2)
    assert refreshes(emulator) == 1
    assert session.last_refresh_at == logged_in_at + 675.0
    await trio.sleep(6 * 3600)  # six hours: one rotation every 675 s
    assert refreshes(emulator) == 1 + (6 * 3600) // 675
    assert session.state is State.ACTIVE


async def test_jitter_spreads_rotation_within_a_few_percent(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(
        nursery, emulator, wall, short_tmp, profiles=tuple(f"p{i}" for i in range(20))
    )
    for i in range(20):
        await broker.login(f"p{i}")
    points = {
        round(p.session.next_refresh_at - p.session.tokens.obtained_at, 3)  # type: ignore[operator,union-attr]
        for p in broker.daemon.profiles.values()
    }
    assert len(points) == 20
    assert all(630 <= point <= 720 for point in points)


async def test_single_flight_under_a_thousand_concurrent_requests(
    autojump_clock: MockClock,
    emulator: Emulator,
    wall: TrioWallClock,
    broker: Broker,
) -> None:
    await broker.login()
    await trio.sleep(600)  # 300 s left; everyone below asks for 400
    connections = [await RawConnection.open(broker.socket) for _ in range(100)]
    for conn in connections:
        await conn.send(b"".join(_token_request(i, 400) for i in range(10)))
    answers = []
    for conn in connections:
        for _ in range(10):
            answers.append(await conn.receive())
        conn.close()
    assert refreshes(emulator) == 1
    assert all(a is not None and a["ok"] for a in answers)
    assert len({a["token"] for a in answers if a}) == 1
    assert all(a["expires_at"] - wall.now() >= 400 for a in answers if a)


def _token_request(request_id: int, min_valid: float) -> bytes:
    from geins_broker_client.protocol import encode

    return encode({"id": request_id, "op": "token", "min_valid": min_valid})


async def test_transient_failures_back_off_exponentially(
    autojump_clock: MockClock,
    emulator: Emulator,
    wall: TrioWallClock,
    broker: Broker,
) -> None:
    await broker.login()
    emulator.server.faults.add(Fault("status", match="GET /api", status=503))
    start = trio.current_time()
    await trio.sleep(675.0 + 1 + 2 + 4 + 8 + 0.5)  # rotation point, then four retries
    session = broker.profile().session
    assert emulator.service.counts["fault 503"] == 5
    assert session.failures == 5
    assert session.state is State.DEGRADED
    assert session.next_refresh_at == pytest.approx(
        wall.now() - trio.current_time() + start + 675 + 31
    )
    async with broker.client() as client:
        token = await client.token()  # still valid: served
        assert token.expires_in(wall.now()) > 200
    emulator.server.clear_faults()
    await trio.sleep(16)
    state_now: State = session.state  # read again: mypy keeps the earlier assert's narrowing
    assert state_now is State.ACTIVE
    assert session.failures == 0


async def test_backoff_caps_at_sixty_seconds_and_recovers(
    autojump_clock: MockClock,
    emulator: Emulator,
    broker: Broker,
) -> None:
    await broker.login()
    emulator.server.faults.add(Fault("status", match="GET /api", status=500))
    await trio.sleep(675 + 1 + 2 + 4 + 8 + 16 + 32 + 0.5)
    assert emulator.service.counts["fault 500"] == 7
    await trio.sleep(120)
    assert emulator.service.counts["fault 500"] == 9  # two more, 60 s apart
    await trio.sleep(50)  # past the bearer's expiry
    async with broker.client() as client:
        with pytest.raises(Unavailable) as info:
            await client.token()  # the error, never an expired token
    assert info.value.code == "upstream_unavailable"
    emulator.server.clear_faults()
    await trio.sleep(61)
    assert broker.profile().session.state is State.ACTIVE


async def test_retry_after_is_honoured(
    autojump_clock: MockClock,
    emulator: Emulator,
    broker: Broker,
) -> None:
    await broker.login()
    emulator.server.faults.add(
        Fault("status", match="GET /api", status=429, retry_after="45", times=1)
    )
    await trio.sleep(675.5)
    session = broker.profile().session
    assert session.failures == 1
    due = session.next_refresh_at
    assert due == pytest.approx(session.tokens.obtained_at + 675 + 45)  # type: ignore[union-attr]
    await trio.sleep(44)
    assert session.failures == 1
    await trio.sleep(1)
    assert session.failures == 0 and session.refreshes == 1


async def test_rejected_refresh_token_needs_a_login_at_once(
    autojump_clock: MockClock,
    emulator: Emulator,
    wall: TrioWallClock,
    broker: Broker,
) -> None:
    await broker.login()
    emulator.service.revoke_user(DEMO_USER)
    await trio.sleep(676)
    session = broker.profile().session
    assert session.state is State.LOGIN_REQUIRED
    assert refreshes(emulator) == 1
    async with broker.client() as client:
        token = await client.token()  # the bearer is still good for 224 s: served
        assert 0 < token.expires_in(wall.now()) < 225
        status = await client.status()
        assert status.profiles[0].state == "login_required"
        await trio.sleep(3600)
        assert refreshes(emulator) == 1  # no retries of a dead refresh token
        with pytest.raises(LoginRequired):
            await client.token()
        await broker.login()
        assert (await client.token()).expires_in(wall.now()) == pytest.approx(900)
    on_disk = json.loads((broker.state_dir / "default.session.json").read_text())
    assert on_disk["login_required"] is False


async def test_session_expiry_from_max_age(
    autojump_clock: MockClock, nursery: trio.Nursery, wall: TrioWallClock, short_tmp: Path
) -> None:
    emulator = Emulator(clock=wall.now, token_ttl=900)
    await emulator.start(nursery)
    broker = await exact_broker(nursery, emulator, wall, short_tmp)
    await broker.login()  # not remembered: the session lasts 30 minutes, sliding
    emulator.server.faults.add(Fault("status", match="GET /api", status=503))
    await trio.sleep(1800.1)
    assert broker.profile().session.state is State.LOGIN_REQUIRED
    assert "lifetime" in (broker.profile().session.last_error or "")


async def test_a_wall_clock_jump_never_serves_an_expired_token(
    autojump_clock: MockClock,
    wall: TrioWallClock,
    broker: Broker,
) -> None:
    await broker.login(remember=True)
    async with broker.client() as client:
        before = await client.token()
        wall.step(2 * 3600)  # a laptop lid closed for two hours: trio's clock stood still
        after = await client.token()
        assert after.token != before.token
        assert after.expires_in(wall.now()) == pytest.approx(900)


async def test_the_runner_notices_a_clock_jump_within_thirty_seconds(
    autojump_clock: MockClock,
    emulator: Emulator,
    wall: TrioWallClock,
    broker: Broker,
) -> None:
    await broker.login(remember=True)
    await trio.sleep(1)
    wall.step(800)
    await trio.sleep(30)
    assert refreshes(emulator) == 1


async def test_not_logged_in(autojump_clock: MockClock, broker: Broker) -> None:
    async with broker.client() as client:
        with pytest.raises(NotLoggedIn):
            await client.token()


async def test_min_valid_longer_than_the_lifetime(
    autojump_clock: MockClock, broker: Broker
) -> None:
    await broker.login()
    async with broker.client() as client:
        with pytest.raises(ProtocolError, match="lifetime"):
            await client.token(min_valid=901)


async def test_waiting_for_a_refresh_is_bounded(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await exact_broker(nursery, emulator, wall, short_tmp, token_wait=5)
    await broker.login()
    emulator.server.faults.add(Fault("stall", match="GET /api"))
    await trio.sleep(10)
    async with broker.client() as client:
        start = trio.current_time()
        with pytest.raises(Unavailable) as info:
            await client.token(min_valid=895)
        assert info.value.code == "timeout"
        assert trio.current_time() - start == pytest.approx(5)
    emulator.server.clear_faults()


async def test_restart_keeps_every_session(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    first = await start_broker(
        nursery, emulator, wall, short_tmp / "a", profiles=("one", "two", "three")
    )
    await first.login("one")
    await first.login("two")
    async with first.client() as client:
        token = await client.token(profile="one")
    first.daemon.stop()
    await trio.sleep(1)
    assert not first.socket.exists()
    second = await start_broker(
        nursery,
        emulator,
        wall,
        short_tmp / "b",
        profiles=("one", "two", "three"),
        state_dir=first.state_dir,
    )
    async with second.client() as client:
        assert (await client.token(profile="one")).token == token.token
        states = {p.profile: p.state for p in (await client.status()).profiles}
    assert states == {"one": "active", "two": "active", "three": "logged_out"}
    await trio.sleep(3600)
    assert second.profile("one").session.refreshes >= 5


async def test_overdue_refreshes_after_a_restart_are_spread_and_bounded(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    names = tuple(f"p{i}" for i in range(40))
    first = await start_broker(nursery, emulator, wall, short_tmp / "a", profiles=names)
    for name in names:
        await first.login(name)
    first.daemon.stop()
    await trio.sleep(1)
    wall.step(800)  # the daemon was down past every rotation point
    emulator.server.faults.add(Fault("latency", match="GET /api", seconds=0.5))
    peak = 0
    second = await start_broker(
        nursery,
        emulator,
        wall,
        short_tmp / "b",
        profiles=names,
        state_dir=first.state_dir,
        startup_spread=10,
        max_concurrent_refreshes=3,
    )
    limiter = second.daemon.roster.limiter
    assert limiter is not None
    start = trio.current_time()
    while any(p.session.refreshes == 0 for p in second.daemon.profiles.values()):
        peak = max(peak, limiter.borrowed_tokens)
        await trio.sleep(0.05)
    elapsed = trio.current_time() - start
    assert peak == 3
    assert 40 * 0.5 / 3 <= elapsed <= 10 + 40 * 0.5 / 3 + 1


async def test_corrupt_state_costs_only_its_profile(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    first = await start_broker(nursery, emulator, wall, short_tmp / "a", profiles=("good", "bad"))
    await first.login("good")
    await first.login("bad")
    first.daemon.stop()
    await trio.sleep(1)
    bad = first.state_dir / "bad.session.json"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    second = await start_broker(
        nursery,
        emulator,
        wall,
        short_tmp / "b",
        profiles=("good", "bad"),
        state_dir=first.state_dir,
    )
    async with second.client() as client:
        states = {p.profile: p.state for p in (await client.status()).profiles}
        await client.token(profile="good")
    assert states == {"good": "active", "bad": "logged_out"}
    assert len(list(first.state_dir.glob("bad.session.json.corrupt-*"))) == 1


async def test_full_disk_keeps_serving_and_retries_the_write(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    tmpfs: Path,
) -> None:
    broker = await exact_broker(nursery, emulator, wall, short_tmp, state_dir=tmpfs / "state")
    await broker.login()
    filler = fill(tmpfs)
    await trio.sleep(676)
    session = broker.profile().session
    assert session.state is State.DEGRADED
    assert "No space left" in (session.store_error or "")
    async with broker.client() as client:
        token = await client.token()
        assert token.token == session.tokens.bearer.reveal()  # type: ignore[union-attr]
        assert "No space left" in ((await client.status()).profiles[0].last_error or "")
    filler.unlink()
    await trio.sleep(64)  # write retries back off: 1, 2, 4, ... seconds
    state_now: State = session.state  # read again: mypy keeps the earlier assert's narrowing
    assert state_now is State.ACTIVE
    on_disk = json.loads((tmpfs / "state" / "default.session.json").read_text())
    assert on_disk["refresh_token"] == session.tokens.refresh.reveal()  # type: ignore[union-attr]
