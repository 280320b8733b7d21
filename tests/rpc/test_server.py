"""The wire protocol over the real Unix socket: every op, every error code, every limit."""

from __future__ import annotations

import struct
from pathlib import Path

import msgpack
import pytest
import trio
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from geins_broker_client import InvalidCredentials, Unavailable, UpstreamError
from geins_broker_client.protocol import Op, encode
from tests.support import Broker, Fraction, RawConnection, start_broker


async def raw(broker: Broker) -> RawConnection:
    return await RawConnection.open(broker.socket)


def error_code(answer: dict[str, object] | None) -> object:
    assert answer is not None and answer["ok"] is False
    return answer["error"]["code"]  # type: ignore[index]


async def test_hello(autojump_clock: MockClock, broker: Broker) -> None:
    conn = await raw(broker)
    answer = await conn.call(id=1, op="hello", v=1, client="test")
    assert answer == {
        "id": 1,
        "ok": True,
        "v": 1,
        "server": "geins-broker/0.1.0",
        "ops": list(Op.ALL),
    }
    conn.close()


async def test_every_op_through_the_client(
    autojump_clock: MockClock, broker: Broker, wall: TrioWallClock
) -> None:
    async with broker.client() as client:
        session = await client.login(DEMO_USER, DEMO_PASSWORD)
        assert session.username == DEMO_USER
        assert session.expires_at == pytest.approx(wall.now() + 900)
        token = await client.token()
        user = await client.user()
        assert (user.username, user.customer_type, user.user_id) == (DEMO_USER, "PERSON", "1000")
        refreshed = await client.refresh()
        assert (await client.token()).token != token.token
        assert refreshed.expires_at >= session.expires_at
        changed = await client.change_password(DEMO_PASSWORD, "n3w-password")
        assert changed.username == DEMO_USER
        with pytest.raises(InvalidCredentials):
            await client.change_password("wrong", "x")
        await client.logout()
        assert (await client.status()).profiles[0].state == "logged_out"
        registered = await client.register(
            "new@example.com", "pw", user={"newsletter": True, "customerType": "PERSON"}
        )
        assert registered.username == "new@example.com"
        assert broker.emulator.service.user_committed("new@example.com")
        assert (await client.user()).username == "new@example.com"


async def test_logout_ends_the_session_upstream(autojump_clock: MockClock, broker: Broker) -> None:
    await broker.login()
    refresh = broker.profile().session.tokens.refresh.reveal()  # type: ignore[union-attr]
    async with broker.client() as client:
        await client.logout()
    assert broker.emulator.service.inspect_refresh(refresh)["state"] == "revoked"
    assert not (broker.state_dir / "default.session.json").exists()


async def test_login_again_ends_the_replaced_session(
    autojump_clock: MockClock, broker: Broker
) -> None:
    await broker.login()
    first = broker.profile().session.tokens.refresh.reveal()  # type: ignore[union-attr]
    await broker.login()
    assert broker.emulator.service.inspect_refresh(first)["state"] == "revoked"
    assert broker.emulator.service.live_sessions(DEMO_USER) == 1


async def test_pipelined_requests_are_answered_by_id(
    autojump_clock: MockClock, broker: Broker
) -> None:
    await broker.login()
    conn = await raw(broker)
    await conn.send(
        encode({"id": 10, "op": "refresh"})  # waits on Geins
        + encode({"id": 11, "op": "token"})
        + encode({"id": 12, "op": "status"})
        + encode({"id": 13, "op": "nope"})
    )
    answers = {a["id"]: a for a in [await conn.receive() for _ in range(4)] if a}
    assert set(answers) == {10, 11, 12, 13}
    assert answers[10]["ok"] and answers[11]["ok"] and answers[12]["ok"]
    assert error_code(answers[13]) == "unknown_op"
    conn.close()


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ({"op": "token"}, "bad_request"),
        ({"id": "1", "op": "token"}, "bad_request"),
        ({"id": 1}, "bad_request"),
        ({"id": 1, "op": 5}, "bad_request"),
        ({"id": 1, "op": "fly"}, "unknown_op"),
        ({"id": 1, "op": "token", "profile": 3}, "bad_request"),
        ({"id": 1, "op": "token", "min_valid": "soon"}, "bad_request"),
        ({"id": 1, "op": "token", "min_valid": -1}, "bad_request"),
        ({"id": 1, "op": "token", "min_valid": True}, "bad_request"),
        ({"id": 1, "op": "token", "profile": "nope"}, "unknown_profile"),
        ({"id": 1, "op": "token"}, "not_logged_in"),
        ({"id": 1, "op": "user"}, "not_logged_in"),
        ({"id": 1, "op": "refresh"}, "not_logged_in"),
        ({"id": 1, "op": "logout"}, "not_logged_in"),
        ({"id": 1, "op": "login", "username": "u"}, "bad_request"),
        ({"id": 1, "op": "login", "username": "", "password": "p"}, "bad_request"),
        (
            {"id": 1, "op": "login", "username": DEMO_USER, "password": "wrong"},
            "invalid_credentials",
        ),
        ({"id": 1, "op": "login", "username": DEMO_USER, "password": 5}, "bad_request"),
        (
            {"id": 1, "op": "login", "username": DEMO_USER, "password": "x", "remember": "yes"},
            "bad_request",
        ),
        (
            {"id": 1, "op": "register", "username": DEMO_USER, "password": "x"},
            "invalid_credentials",
        ),
        (
            {"id": 1, "op": "register", "username": "a@b", "password": "x", "user": [1]},
            "bad_request",
        ),
        ({"id": 1, "op": "change_password", "password": "x"}, "bad_request"),
        ({"id": 1, "op": "change_password", "password": "x", "new_password": "y"}, "not_logged_in"),
        ({"id": 1, "op": "hello", "v": "one"}, "bad_request"),
    ],
)
async def test_error_codes(
    autojump_clock: MockClock, broker: Broker, message: dict[str, object], code: str
) -> None:
    conn = await raw(broker)
    answer = await conn.call(**message)
    assert answer["id"] == (message["id"] if isinstance(message.get("id"), int) else None)
    assert error_code(answer) == code
    assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
    assert (await conn.call(id=99, op="hello"))["ok"]  # the connection stays open
    conn.close()


async def test_login_required_code(autojump_clock: MockClock, broker: Broker) -> None:
    await broker.login()
    broker.emulator.service.revoke_user(DEMO_USER)
    conn = await raw(broker)
    assert error_code(await conn.call(id=1, op="refresh")) == "login_required"
    conn.close()
    await trio.sleep(901)
    conn = await raw(broker)
    assert error_code(await conn.call(id=2, op="token")) == "login_required"
    conn.close()


async def test_upstream_codes(autojump_clock: MockClock, broker: Broker) -> None:
    server = broker.emulator.server
    conn = await raw(broker)
    login = {"op": "login", "username": DEMO_USER, "password": DEMO_PASSWORD}
    server.faults.add(Fault("status", status=502, times=1))
    assert error_code(await conn.call(id=1, **login)) == "upstream_unavailable"
    server.faults.add(Fault("stall", times=1))
    assert error_code(await conn.call(id=2, **login)) == "timeout"
    server.clear_faults()
    server.faults.add(Fault("status", status=418, times=1))
    assert error_code(await conn.call(id=3, **login)) == "upstream_error"
    assert (await conn.call(id=4, **login))["ok"]
    conn.close()


async def test_wrong_api_key_is_an_upstream_error(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(
        nursery, emulator, wall, short_tmp, profile_settings={"api_key": "wrong"}
    )
    async with broker.client() as client:
        with pytest.raises(UpstreamError, match="API key"):
            await client.login(DEMO_USER, DEMO_PASSWORD)


async def test_internal_errors_are_answered_and_logged(
    autojump_clock: MockClock,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(peer: object, args: object) -> dict[str, object]:
        raise RuntimeError("bug")

    monkeypatch.setitem(broker.daemon.server.api.immediate, "status", broken)  # type: ignore[union-attr]
    conn = await raw(broker)
    assert error_code(await conn.call(id=1, op="status")) == "internal"
    assert (await conn.call(id=2, op="hello"))["ok"]
    assert "internal_error" in caplog.text
    conn.close()


@pytest.mark.parametrize(
    "data",
    [
        struct.pack(">I", 64 * 1024 + 1),
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",
        struct.pack(">I", 2) + msgpack.packb([1]),
        struct.pack(">I", 0),
    ],
)
async def test_bad_frames_get_one_answer_then_the_close(
    autojump_clock: MockClock, broker: Broker, data: bytes
) -> None:
    conn = await raw(broker)
    await conn.send(encode({"id": 1, "op": "hello"}) + data + encode({"id": 2, "op": "hello"}))
    assert (await conn.receive())["id"] == 1  # type: ignore[index]
    answer = await conn.receive()
    assert answer is not None and answer["id"] is None and error_code(answer) == "bad_frame"
    assert await conn.receive() is None
    conn.close()
    other = await raw(broker)
    assert (await other.call(id=1, op="hello"))["ok"]
    other.close()


async def test_half_frame_times_out_without_holding_anything(
    autojump_clock: MockClock, broker: Broker
) -> None:
    stalled = await raw(broker)
    await stalled.send(struct.pack(">I", 100) + b"\x81")
    other = await raw(broker)
    for i in range(5):
        assert (await other.call(id=i, op="hello"))["ok"]
    start = trio.current_time()
    assert await stalled.receive() is None
    assert trio.current_time() - start == pytest.approx(10, abs=0.01)  # frame_timeout
    stalled.close()
    other.close()


async def test_idle_connections_are_closed(autojump_clock: MockClock, broker: Broker) -> None:
    conn = await raw(broker)
    assert (await conn.call(id=1, op="hello"))["ok"]
    start = trio.current_time()
    assert await conn.receive() is None
    assert trio.current_time() - start == pytest.approx(300, abs=0.01)  # idle_timeout
    conn.close()


async def test_a_client_that_never_reads_is_dropped(
    autojump_clock: MockClock, broker: Broker
) -> None:
    await broker.login()
    greedy = await raw(broker)
    greedy.sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    request = encode({"id": 1, "op": "token"})
    start = trio.current_time()
    with pytest.raises((BrokenPipeError, ConnectionResetError)), trio.fail_after(60):  # noqa: PT012
        while True:  # pour requests in, read nothing back, until the daemon hangs up
            await greedy.send(request * 100)
    assert trio.current_time() - start == pytest.approx(10, abs=0.1)  # send_timeout
    assert broker.daemon.server.connections == 0  # type: ignore[union-attr]
    other = await raw(broker)
    assert (await other.call(id=1, op="token"))["ok"]
    other.close()
    greedy.close()


async def test_too_many_waiting_requests_on_one_connection(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(nursery, emulator, wall, short_tmp, max_requests_per_connection=2)
    await broker.login()
    emulator.server.faults.add(Fault("latency", seconds=5))
    conn = await raw(broker)
    await conn.send(b"".join(encode({"id": i, "op": "refresh"}) for i in range(3)))
    answers = {a["id"]: a for a in [await conn.receive() for _ in range(3)] if a}
    assert error_code(answers[2]) == "busy"
    assert answers[0]["ok"]
    conn.close()


async def test_connection_limit(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(nursery, emulator, wall, short_tmp, max_connections=3)
    held = [await raw(broker) for _ in range(3)]
    for i, conn in enumerate(held):
        assert (await conn.call(id=i, op="hello"))["ok"]
    refused = await raw(broker)
    answer = await refused.receive()
    assert answer is not None and answer["id"] is None and error_code(answer) == "busy"
    assert await refused.receive() is None
    refused.close()
    held.pop().close()
    await trio.sleep(0.1)
    again = await raw(broker)
    assert (await again.call(id=1, op="hello"))["ok"]
    for conn in [*held, again]:
        conn.close()


async def test_busy_connection_limit_maps_to_unavailable(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(nursery, emulator, wall, short_tmp, max_connections=1)
    holder = await raw(broker)
    assert (await holder.call(id=1, op="hello"))["ok"]
    async with broker.client() as client:
        with pytest.raises(Unavailable) as info:
            await client.hello()
    assert info.value.code == "busy"
    holder.close()


async def test_watch_streams_rotations_and_the_end(
    autojump_clock: MockClock, broker: Broker, wall: TrioWallClock
) -> None:
    conn = await raw(broker)
    await conn.request(id=7, op="watch")
    first = await conn.receive()
    assert first == {"id": 7, "ok": True, "event": "logged_out"}
    await broker.login()
    login = await conn.receive()
    assert login is not None and login["event"] == "token" and login["id"] == 7
    rotated = await conn.receive()  # ~675 s later
    assert (
        rotated is not None and rotated["event"] == "token" and rotated["token"] != login["token"]
    )
    assert rotated["expires_at"] == pytest.approx(wall.now() + 900)
    assert (await conn.call(id=8, op="hello"))["ok"]  # the connection still takes requests
    broker.emulator.service.revoke_user(DEMO_USER)
    assert (await conn.receive()) == {"id": 7, "ok": True, "event": "login_required"}
    await broker.login()
    assert (await conn.receive())["event"] == "token"  # type: ignore[index]
    async with broker.client() as client:
        await client.logout()
    assert (await conn.receive()) == {"id": 7, "ok": True, "event": "logged_out"}
    conn.close()


async def test_watch_through_the_client(autojump_clock: MockClock, broker: Broker) -> None:
    await broker.login()
    async with broker.client() as client:
        events = client.watch()
        first = await events.__anext__()
        second = await events.__anext__()
        await events.aclose()
    assert first.token is not None and second.token is not None
    assert first.token.token != second.token.token
    assert repr(first.token).count(first.token.token) == 0


async def test_client_reconnects_after_a_restart(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    first = await start_broker(nursery, emulator, wall, short_tmp)
    await first.login()
    client = first.client()
    token = await client.token()
    first.daemon.stop()
    await trio.sleep(1)
    await start_broker(nursery, emulator, wall, short_tmp)
    assert (await client.token()).token == token.token
    await client.aclose()


async def test_client_notices_an_idle_timeout_before_a_login(
    autojump_clock: MockClock, broker: Broker
) -> None:
    """The daemon closed the idle connection; a non-idempotent call must not be lost."""
    async with broker.client() as client:
        await client.hello()
        await trio.sleep(301)  # past idle_timeout: the daemon hung up
        session = await client.login(DEMO_USER, DEMO_PASSWORD)
        assert session.username == DEMO_USER


@pytest.mark.parametrize("min_valid", [-1, float("nan"), float("inf")])
async def test_bad_min_valid_on_the_fast_path(
    autojump_clock: MockClock, broker: Broker, min_valid: float
) -> None:
    await broker.login()
    conn = await raw(broker)
    answer = await conn.call(id=1, op="token", min_valid=min_valid)
    assert error_code(answer) == "bad_request"
    conn.close()


async def test_a_trickled_half_frame_still_times_out(
    autojump_clock: MockClock, broker: Broker
) -> None:
    """The frame clock starts at the frame's first byte, not its latest one."""
    conn = await RawConnection.open(broker.socket)
    start = trio.current_time()
    frame = encode({"id": 1, "op": "hello"})
    with pytest.raises((BrokenPipeError, ConnectionResetError)):  # noqa: PT012 - it hangs up
        for byte in frame[:-1]:
            await conn.send(bytes([byte]))
            await trio.sleep(3)
    assert 10 <= trio.current_time() - start <= 13  # closed at 10 s; noticed at the next send
    conn.close()


async def test_token_waiters_hear_of_a_logout_at_once(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(
        nursery, emulator, wall, short_tmp, rng=Fraction(1.0), profile_settings={"jitter": 0}
    )
    await broker.login()
    emulator.server.faults.add(Fault("status", status=503, match="GET /api"))
    await trio.sleep(675 + 1 + 2 + 4 + 0.5)  # four failures; the next try is 8 s away
    waiter = await raw(broker)
    await waiter.request(id=1, op="token", min_valid=899)  # waits for that try
    await trio.sleep(1)
    start = trio.current_time()
    async with broker.client() as admin:
        await admin.logout()
    answer = await waiter.receive()
    assert error_code(answer) == "not_logged_in"
    assert trio.current_time() - start < 1  # told at once, not after the try or the 15-s wait
    waiter.close()
