"""The token hot path in C (broker/rpc/_fastpath.c) answers exactly what Python would.

The first `token` request on a connection is always Python's (it fills the connection's
ACL cache); the same request sent again on that connection is the C path's whenever the
C path takes it. So each frame here is sent twice on one connection of one daemon and
the two answers compared byte for byte, with `fast_answers` saying which path answered.
`scripts/test` runs this suite with the accelerator and again with
`GEINS_BROKER_FASTPATH=0` (where the tests that need it skip, saying so).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import msgpack
import pytest
import trio
import trio.testing
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from broker.rpc import fastpath
from broker.rpc.reactor import Server
from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from tests.support import Broker, RawConnection, start_broker

_HEADER = struct.Struct(">I")

# Every test here is about the C path: where it does not run (not built, or switched off
# for scripts/test's pure-Python pass), each is skipped with the reason.
pytestmark = pytest.mark.skipif(
    fastpath.unavailable() is not None,
    reason=f"the C hot path is not running: {fastpath.unavailable()}",
)


@pytest.fixture
def server(broker: Broker) -> Server:
    server = broker.daemon.server
    assert server is not None
    if not server.accelerated:
        pytest.skip(f"the C hot path is not running: {fastpath.unavailable()}")
    return server


def frame(body: bytes) -> bytes:
    return _HEADER.pack(len(body)) + body


def packed(message: object) -> bytes:
    return frame(msgpack.packb(message, use_bin_type=True))


async def receive_raw(conn: RawConnection) -> bytes:
    """The next whole frame's bytes as sent (b"" at end of stream)."""
    data = b""
    while len(data) < 4 or len(data) < 4 + _HEADER.unpack_from(data)[0]:
        more = await conn.sock.recv(MAX_RESPONSE_SIZE)
        if not more:
            return data
        data += more
    return data


async def twice(broker: Broker, server: Server, request: bytes) -> tuple[bytes, bytes, int]:
    """The answers to `request` sent twice on one fresh connection, and how many of the
    two the C path answered."""
    conn = await RawConnection.open(broker.socket)
    try:
        before = server.fast_answers
        await conn.send(request)
        first = await receive_raw(conn)
        if not first:
            return first, b"", server.fast_answers - before
        try:
            await conn.send(request)
        except OSError:  # closed after a bad frame's answer
            return first, b"", server.fast_answers - before
        second = await receive_raw(conn)
        return first, second, server.fast_answers - before
    finally:
        conn.close()


def str8(text: str) -> bytes:
    data = text.encode()
    return bytes([0xD9, len(data)]) + data


def fixstr(text: str) -> bytes:
    data = text.encode()
    return bytes([0xA0 | len(data)]) + data


def by_hand(*pairs: tuple[bytes, bytes]) -> bytes:
    """A map written entry by entry (encodings msgpack's packer would not choose)."""
    return frame(bytes([0x80 | len(pairs)]) + b"".join(k + v for k, v in pairs))


_ID_BOUNDARIES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
]  # fmt: skip

#: Requests the C path must answer, as Python answers them.
TAKEN = {
    **{f"id {i}": packed({"id": i, "op": "token"}) for i in _ID_BOUNDARIES},
    "named profile": packed({"op": "token", "profile": "default", "id": 7}),
    "min_valid int": packed({"id": 8, "op": "token", "min_valid": 60}),
    "min_valid float": packed({"id": 9, "op": "token", "min_valid": 0.5}),
    "min_valid -0.0": packed({"id": 10, "op": "token", "min_valid": -0.0}),
    "min_valid float32": by_hand(
        (fixstr("id"), b"\x0b"),
        (fixstr("op"), fixstr("token")),
        (fixstr("min_valid"), b"\xca" + struct.pack(">f", 1.5)),
    ),
    "id as uint64": by_hand(
        (fixstr("id"), b"\xcf" + (5).to_bytes(8, "big")), (fixstr("op"), fixstr("token"))
    ),
    "id as int8": by_hand((fixstr("id"), b"\xd0\x05"), (fixstr("op"), fixstr("token"))),
    "op as str8": by_hand((fixstr("id"), b"\x0f"), (fixstr("op"), str8("token"))),
    "str8 keys": by_hand((str8("id"), b"\x0c"), (str8("op"), fixstr("token"))),
    "profile as str8": by_hand(
        (fixstr("id"), b"\x0d"),
        (fixstr("op"), fixstr("token")),
        (fixstr("profile"), str8("default")),
    ),
    "profile as str16": by_hand(
        (fixstr("id"), b"\x0e"),
        (fixstr("op"), fixstr("token")),
        (fixstr("profile"), b"\xda\x00\x07default"),
    ),
}

#: Requests the C path must leave to Python: the answers are Python's, both times.
LEFT = {
    "unknown profile": packed({"id": 1, "op": "token", "profile": "nope"}),
    "profile as bin": packed({"id": 1, "op": "token", "profile": b"default"}),
    "profile not UTF-8": by_hand(
        (fixstr("id"), b"\x01"), (fixstr("op"), fixstr("token")), (fixstr("profile"), b"\xa2\xff\xfe")
    ),
    "id bool": packed({"id": True, "op": "token"}),
    "id float": packed({"id": 1.0, "op": "token"}),
    "id nil": packed({"id": None, "op": "token"}),
    "id missing": packed({"op": "token"}),
    "id past int64": packed({"id": 2**64 - 1, "op": "token"}),
    "min_valid negative": packed({"id": 1, "op": "token", "min_valid": -1}),
    "min_valid NaN": packed({"id": 1, "op": "token", "min_valid": float("nan")}),
    "min_valid inf": packed({"id": 1, "op": "token", "min_valid": float("inf")}),
    "min_valid past the bearer": packed({"id": 1, "op": "token", "min_valid": 10**6}),
    "min_valid huge int": packed({"id": 1, "op": "token", "min_valid": 2**60}),
    "min_valid bool": packed({"id": 1, "op": "token", "min_valid": True}),
    "min_valid nil": packed({"id": 1, "op": "token", "min_valid": None}),
    "duplicate id": by_hand((fixstr("id"), b"\x01"), (fixstr("op"), fixstr("token")), (fixstr("id"), b"\x02")),
    "unknown key": packed({"id": 1, "op": "token", "v": 1}),
    "other op": packed({"id": 1, "op": "hello"}),
    "map16": frame(b"\xde\x00\x02" + fixstr("id") + b"\x01" + fixstr("op") + fixstr("token")),
    "empty map": packed({}),
    "trailing byte": frame(msgpack.packb({"id": 1, "op": "token"}) + b"\xc0"),
    "truncated map": frame(b"\x83" + fixstr("id") + b"\x01" + fixstr("op") + fixstr("token")),
    "string overruns the frame": by_hand((fixstr("id"), b"\x01"), (fixstr("op"), b"\xd9\xff" + b"token")),
    "key of 31 bytes": packed({"id": 1, "op": "token", "k" * 31: 1}),
    "not a map": packed([1, "token"]),
    "empty frame": frame(b""),
    "two frames in one read": packed({"id": 1, "op": "token"}) * 2,
    "a frame and a half": packed({"id": 1, "op": "token"}) + packed({"id": 2, "op": "token"})[:5],
}  # fmt: skip


@pytest.mark.parametrize("request_frame", TAKEN.values(), ids=TAKEN.keys())
async def test_what_the_c_path_answers_is_what_python_answers(
    autojump_clock: MockClock, broker: Broker, server: Server, request_frame: bytes
) -> None:
    await broker.login()
    first, second, fast = await twice(broker, server, request_frame)
    assert FrameDecoder(MAX_RESPONSE_SIZE).feed(first)[0]["ok"] is True
    assert second == first
    assert fast == 1  # the second, in C


@pytest.mark.parametrize("request_frame", LEFT.values(), ids=LEFT.keys())
async def test_what_the_c_path_does_not_take_python_answers(
    autojump_clock: MockClock, broker: Broker, server: Server, request_frame: bytes
) -> None:
    await broker.login()
    # The connection's ACL cache is filled first, so nothing but the frame itself keeps
    # the C path from answering it.
    conn = await RawConnection.open(broker.socket)
    await conn.send(packed({"id": 0, "op": "token"}))
    assert await receive_raw(conn)
    before = server.fast_answers
    await conn.send(request_frame)
    in_c = await receive_raw(conn)
    conn.close()
    assert server.fast_answers == before
    # And Python's own answer on a fresh connection is the same.
    conn = await RawConnection.open(broker.socket)
    await conn.send(request_frame)
    in_python = await receive_raw(conn)
    conn.close()
    assert in_c == in_python


async def test_a_rotation_is_served_at_once(
    autojump_clock: MockClock, broker: Broker, server: Server
) -> None:
    """The C path serves a profile's prepared answer only at the session's revision it
    was prepared for: after a refresh, the next answer holds the new bearer."""
    await broker.login()
    conn = await RawConnection.open(broker.socket)
    old = (await conn.call(id=1, op="token"))["token"]
    before = server.fast_answers
    assert (await conn.call(id=2, op="token"))["token"] == old
    assert server.fast_answers == before + 1
    async with broker.client() as client:
        await client.refresh()
    new = (await conn.call(id=3, op="token"))["token"]  # Python's: it re-prepares
    assert new != old
    assert server.fast_answers == before + 1
    assert (await conn.call(id=4, op="token"))["token"] == new  # C's again
    assert server.fast_answers == before + 2
    conn.close()


async def test_a_logout_is_served_at_once(
    autojump_clock: MockClock, broker: Broker, server: Server
) -> None:
    await broker.login()
    conn = await RawConnection.open(broker.socket)
    await conn.call(id=1, op="token")
    assert (await conn.call(id=2, op="token"))["ok"] is True
    async with broker.client() as client:
        await client.logout()
    answer = await conn.call(id=3, op="token")
    assert answer["ok"] is False
    assert answer["error"]["code"] == "not_logged_in"
    conn.close()


async def test_the_bearers_expiry_is_checked_on_the_wall_clock(
    autojump_clock: MockClock, broker: Broker, server: Server
) -> None:
    """With Geins down, the held bearer runs out: the C path serves it until its expiry
    and not after, and the caller then gets Python's answer (an error, here)."""
    await broker.login()
    conn = await RawConnection.open(broker.socket)
    first = await conn.call(id=1, op="token")
    broker.emulator.server.faults.add(Fault("status", status=503))
    conn.close()
    await trio.sleep(first["expires_at"] - broker.daemon.wall.now() - 1)
    conn = await RawConnection.open(broker.socket)  # (the first one timed out, idle)
    await conn.call(id=2, op="token")  # Python's, filling the ACL cache
    before = server.fast_answers
    assert (await conn.call(id=3, op="token"))["token"] == first["token"]
    assert server.fast_answers == before + 1
    await trio.sleep(2)
    late = await conn.call(id=4, op="token")
    assert late["ok"] is False
    assert server.fast_answers == before + 1
    conn.close()


async def test_an_answer_the_socket_does_not_take_is_kept_in_order(
    autojump_clock: MockClock, broker: Broker, server: Server
) -> None:
    """A client that asks and never reads: once its socket is full, the C path hands the
    rest of an answer to the reactor, which keeps it and stops reading; the client then
    reads every answer, whole and in order."""
    await broker.login()
    conn = await RawConnection.open(broker.socket)
    await conn.call(id=0, op="token")
    before = server.fast_answers
    sent = 0
    for request_id in range(1, 2000):
        await conn.request(id=request_id, op="token")
        sent = request_id
        await trio.testing.wait_all_tasks_blocked()
        if server.fast_answers == before + request_id - 1:
            break  # this one was not answered in C: the socket was full
    assert sent > 10
    ids: list[int] = []
    while len(ids) < sent:
        answer = await conn.receive()
        assert answer is not None and answer["ok"] is True
        ids.append(answer["id"])
    assert ids == list(range(1, sent + 1))
    conn.close()


async def test_random_frames_get_the_same_answers_both_ways(
    autojump_clock: MockClock, broker: Broker, server: Server
) -> None:
    """Frames made by mutating a token request (bytes flipped, cut, inserted, the
    length prefix kept true): whatever each is, the answer sent twice on one connection
    is the same both times, and the daemon serves on."""
    await broker.login()
    rng = random.Random(23)
    seeds = [*TAKEN.values()]
    answered_in_c = 0
    for _ in range(600):
        body = bytearray(rng.choice(seeds)[4:])
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(body))
            match rng.randrange(3):
                case 0:
                    body[where] = rng.randrange(256)
                case 1:
                    del body[where]
                case _:
                    body.insert(where, rng.randrange(256))
        first, second, fast = await twice(broker, server, frame(bytes(body)))
        answered_in_c += fast
        if first and FrameDecoder(MAX_RESPONSE_SIZE).feed(first)[0].get("ok"):
            assert second == first
        else:
            assert fast == 0
    assert answered_in_c > 0
    async with broker.client() as client:
        assert (await client.token()).token


def test_a_token_request_made_by_the_client_is_one_the_c_path_takes() -> None:
    """What the clients send (the shared codec) is the shape the C parser takes."""
    assert encode({"id": 1, "op": "token"}) == packed({"id": 1, "op": "token"})


# -- customer sessions: `session_token` ---------------------------------------------------


@pytest.fixture
async def shop(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> Broker:
    """A daemon with the apps `shop` (60 s idle end) and `outlet`."""
    apps = {"shop": {"jitter": 0, "idle_short": 60, "active_for": 30}, "outlet": {"jitter": 0}}
    broker = await start_broker(nursery, emulator, wall, short_tmp, apps=apps)
    assert broker.daemon.server is not None
    if not broker.daemon.server.accelerated:
        pytest.skip(f"the C hot path is not running: {fastpath.unavailable()}")
    return broker


async def session(shop: Broker, app: str = "shop") -> str:
    async with shop.client() as client:
        return (await client.session_login(app, DEMO_USER, DEMO_PASSWORD)).handle


def session_requests(handle: str) -> dict[str, bytes]:
    return {
        "plain": packed({"id": 1, "op": "session_token", "app": "shop", "handle": handle}),
        "min_valid int": packed(
            {"id": 300, "op": "session_token", "app": "shop", "handle": handle, "min_valid": 60}
        ),
        "min_valid float": packed(
            {"id": -5, "op": "session_token", "handle": handle, "app": "shop", "min_valid": 1.5}
        ),
        "handle as str8": by_hand(
            (fixstr("id"), b"\x02"),
            (fixstr("op"), fixstr("session_token")),
            (fixstr("app"), fixstr("shop")),
            (fixstr("handle"), str8(handle)),
        ),
    }


async def test_a_session_token_from_c_is_what_python_answers(
    autojump_clock: MockClock, shop: Broker
) -> None:
    server = shop.daemon.server
    assert server is not None
    handle = await session(shop)
    for name, request in session_requests(handle).items():
        first, second, fast = await twice(shop, server, request)
        assert FrameDecoder(MAX_RESPONSE_SIZE).feed(first)[0]["ok"] is True, name
        assert second == first, name
        assert fast == 1, name


async def test_what_a_session_token_from_c_leaves_to_python(
    autojump_clock: MockClock, shop: Broker
) -> None:
    """Another app's handle, an unknown one, an app not configured, a profile key, a
    min_valid past the bearer: Python's answers, both times."""
    server = shop.daemon.server
    assert server is not None
    handle, outlets = await session(shop), await session(shop, "outlet")
    conn = await RawConnection.open(shop.socket)
    await conn.send(session_requests(handle)["plain"])
    assert await receive_raw(conn)  # the ACL cache filled for `shop`
    left: dict[str, dict[str, object]] = {
        "another app's handle": {"app": "shop", "handle": outlets},
        "unknown handle": {"app": "shop", "handle": "x" * 43},
        "no such app": {"app": "nope", "handle": handle},
        "app missing": {"handle": handle},
        "handle missing": {"app": "shop"},
        "profile key": {"app": "shop", "handle": handle, "profile": "default"},
        "min_valid past the bearer": {"app": "shop", "handle": handle, "min_valid": 10**5},
        "handle not a string": {"app": "shop", "handle": 7},
    }
    for name, fields in left.items():
        request = packed({"id": 9, "op": "session_token", **fields})
        before = server.fast_answers
        await conn.send(request)
        in_c = await receive_raw(conn)
        assert server.fast_answers == before, name
        fresh = await RawConnection.open(shop.socket)
        await fresh.send(request)
        assert await receive_raw(fresh) == in_c, name
        fresh.close()
    conn.close()


async def test_a_session_past_its_idle_end_is_not_served_from_c(
    autojump_clock: MockClock, shop: Broker
) -> None:
    """The bearer has 14 minutes left; the session's idle end (60 s) has passed: the
    session manager's hot path says no, and Python's long way ends the session."""
    server = shop.daemon.server
    assert server is not None
    handle = await session(shop)
    conn = await RawConnection.open(shop.socket)
    request = session_requests(handle)["plain"]
    await conn.send(request)
    await receive_raw(conn)
    await conn.send(request)
    await receive_raw(conn)
    conn.close()
    await trio.sleep(61)
    before = server.fast_answers
    first, second, fast = await twice(shop, server, request)
    assert FrameDecoder(MAX_RESPONSE_SIZE).feed(first)[0]["error"]["code"] == "unknown_session"
    assert second == first
    assert fast == 0
    assert server.fast_answers == before
