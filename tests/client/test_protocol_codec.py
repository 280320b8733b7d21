"""The frame codec, without sockets: bytes in, messages out (and back)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geins_broker_client.protocol import (
    MAX_REQUEST_SIZE,
    FrameDecoder,
    FrameError,
    PreparedResponse,
    decode_body,
    encode,
)


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def test_round_trip() -> None:
    message = {"id": 7, "op": "token", "profile": "shop", "min_valid": 30.5}
    decoder = FrameDecoder()
    assert decoder.feed(encode(message)) == [message]
    assert decoder.buffered == 0


def test_byte_at_a_time_and_pipelined() -> None:
    data = encode({"id": 1, "op": "hello"}) + encode({"id": 2, "op": "status"})
    decoder = FrameDecoder()
    out: list[Any] = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert [m["id"] for m in out] == [1, 2]
    assert FrameDecoder().feed(data) == out


def test_partial_frame_waits() -> None:
    data = encode({"id": 1, "op": "hello"})
    decoder = FrameDecoder()
    assert decoder.feed(data[:3]) == []
    assert decoder.feed(data[3:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:]) == [{"id": 1, "op": "hello"}]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (struct.pack(">I", MAX_REQUEST_SIZE + 1), "over the"),
        (struct.pack(">I", 0xFFFFFFFF), "over the"),
        (frame(b""), "empty frame"),
        (frame(b"\xc1"), "not one msgpack value"),
        (frame(b"\x01\x02"), "not one msgpack value"),
        (frame(b"\x92\x01"), "not one msgpack value"),
        (frame(msgpack.packb([1, 2])), "not a map"),
        (frame(msgpack.packb("hi")), "not a map"),
        (frame(b"\x81\x01\x02"), "not one msgpack value"),
        (frame(b"\x81\xc4\x01a\x01"), "not strings"),
        (frame(b"\xa2\xff\xfe"), "not one msgpack value"),
        (frame(b"\x91" * 5000), "not one msgpack value"),
    ],
)
def test_unreadable_frames(data: bytes, reason: str) -> None:
    decoder = FrameDecoder()
    good = encode({"id": 1, "op": "hello"})
    assert decoder.feed(good + data + good) == [{"id": 1, "op": "hello"}]
    assert decoder.error is not None
    assert reason in str(decoder.error)
    assert decoder.feed(good) == []  # out of step for good


def test_one_takes_only_a_lone_whole_frame() -> None:
    """`one` is the reactor's shortcut: it must decode exactly what `feed` would, and
    take nothing it does not decode, or a pipelined or split request would be lost."""
    message = {"id": 3, "op": "token"}
    whole = encode(message)
    assert FrameDecoder().one(whole) == message
    for data in (whole + whole, whole[:-1], whole[:3], frame(b"\x80" * 10)[:-2]):
        decoder = FrameDecoder()
        assert decoder.one(data) is None
        assert decoder.buffered == 0
        assert decoder.error is None
    decoder = FrameDecoder()
    assert decoder.feed(whole[:5]) == []
    assert decoder.one(whole) is None  # something is buffered: feed() must order it
    assert decoder.feed(whole[5:]) == [message]


@pytest.mark.parametrize(
    "data",
    [frame(b"\x81\xc4\x01a\x01"), frame(msgpack.packb([1])), struct.pack(">I", 10**6) + b"x"],
)
def test_one_refuses_what_feed_refuses(data: bytes) -> None:
    decoder = FrameDecoder(MAX_REQUEST_SIZE)
    assert decoder.one(data) is None
    decoder.feed(data)
    assert decoder.error is not None
    assert decoder.one(encode({"id": 1, "op": "hello"})) is None  # out of step for good


def test_deep_nesting_is_refused_not_a_crash() -> None:
    body = b"\x81\xa1a" + b"\x81\xa1a" * 2000 + b"\xc0"
    with pytest.raises(FrameError):
        decode_body(body)


def test_prepared_response_matches_plain_encoding() -> None:
    fields = {"ok": True, "profile": "default", "token": "a.b.c", "expires_at": 1800000900.5}
    prepared = PreparedResponse(fields)
    for request_id in (0, 1, 127, 128, 65535, 2**40, -5, None):
        assert prepared.frame(request_id) == encode({"id": request_id, **fields})


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=8))
def test_any_map_round_trips(message: dict[str, Any]) -> None:
    assert FrameDecoder().feed(encode(message)) == [message]


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_fuzzed_bytes_never_escape_as_anything_but_frame_error(data: bytes, chunk: int) -> None:
    decoder = FrameDecoder()
    for i in range(0, len(data), chunk):
        for message in decoder.feed(data[i : i + chunk]):
            assert isinstance(message, dict)
            assert all(isinstance(k, str) for k in message)
    assert decoder.error is None or isinstance(decoder.error, FrameError)


def test_feed_can_leave_frames_for_later() -> None:
    data = b"".join(encode({"id": i, "op": "token"}) for i in range(10))
    decoder = FrameDecoder()
    assert [m["id"] for m in decoder.feed(data, 4)] == [0, 1, 2, 3]
    assert decoder.complete
    assert [m["id"] for m in decoder.feed(b"", 4)] == [4, 5, 6, 7]
    assert [m["id"] for m in decoder.feed(encode({"id": 10}), 4)] == [8, 9, 10]
    complete: bool = decoder.complete  # read again: mypy keeps the earlier assert's narrowing
    assert not complete
    assert decoder.buffered == 0
    decoder.feed(encode({"id": 11})[:5])
    assert decoder.buffered == 5
    assert not decoder.complete
