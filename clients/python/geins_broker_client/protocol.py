"""The geins-broker wire protocol, version 1: frames, op names and error codes.

This module is the one place the wire format is written down in code. The daemon and
every Python client (blocking, trio, asyncio) feed bytes into the same `FrameDecoder`
and build frames with the same `encode`, so they cannot drift apart. It is sans-IO: no
sockets, no clocks, nothing but bytes in and messages out. docs/protocol.md is the same
contract in prose, for clients in other languages.

A frame is a 4-byte unsigned big-endian length N, then N bytes holding one msgpack map
with string keys.
"""

from __future__ import annotations

import struct

import msgpack

# No typing at run time: see calls.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Final, TypeGuard

    Message = dict[str, Any]

VERSION: Final = 1

#: The profile a request names when it names none (the daemon and every client agree).
DEFAULT_PROFILE: Final = "default"

#: Bytes asked of the socket per read, by the daemon and every client.
RECV_SIZE: Final = 65536

#: The largest request body the daemon reads; a longer frame ends the connection.
MAX_REQUEST_SIZE: Final = 64 * 1024
#: The largest response body a client accepts. `status` with ten thousand profiles fits.
MAX_RESPONSE_SIZE: Final = 16 * 1024 * 1024

_HEADER: Final = struct.Struct(">I")
HEADER_SIZE: Final = _HEADER.size


class Op:
    """The operations a v1 daemon answers."""

    HELLO: Final = "hello"
    TOKEN: Final = "token"  # noqa: S105 - an op name
    USER: Final = "user"
    STATUS: Final = "status"
    LOGIN: Final = "login"
    LOGOUT: Final = "logout"
    REFRESH: Final = "refresh"
    CHANGE_PASSWORD: Final = "change_password"  # noqa: S105 - an op name
    REGISTER: Final = "register"
    WATCH: Final = "watch"
    METRICS: Final = "metrics"
    # Customer sessions (docs/sessions.md): named by an app and a handle.
    SESSION_LOGIN: Final = "session_login"
    SESSION_REGISTER: Final = "session_register"
    SESSION_TOKEN: Final = "session_token"  # noqa: S105 - an op name
    SESSION_INFO: Final = "session_info"
    SESSION_PASSWD: Final = "session_passwd"  # noqa: S105 - an op name
    SESSION_LOGOUT: Final = "session_logout"
    SESSIONS: Final = "sessions"
    SESSION_END: Final = "session_end"

    ALL: Final = (
        HELLO,
        TOKEN,
        USER,
        STATUS,
        LOGIN,
        LOGOUT,
        REFRESH,
        CHANGE_PASSWORD,
        REGISTER,
        WATCH,
        METRICS,
        SESSION_LOGIN,
        SESSION_REGISTER,
        SESSION_TOKEN,
        SESSION_INFO,
        SESSION_PASSWD,
        SESSION_LOGOUT,
        SESSIONS,
        SESSION_END,
    )


class Code:
    """Error codes carried in `{"ok": false, "error": {"code": ..., "message": ...}}`."""

    BAD_FRAME: Final = "bad_frame"
    BAD_REQUEST: Final = "bad_request"
    UNKNOWN_OP: Final = "unknown_op"
    UNKNOWN_PROFILE: Final = "unknown_profile"
    FORBIDDEN: Final = "forbidden"
    NOT_LOGGED_IN: Final = "not_logged_in"
    LOGIN_REQUIRED: Final = "login_required"
    INVALID_CREDENTIALS: Final = "invalid_credentials"
    UPSTREAM_UNAVAILABLE: Final = "upstream_unavailable"
    UPSTREAM_ERROR: Final = "upstream_error"
    TIMEOUT: Final = "timeout"
    UNKNOWN_APP: Final = "unknown_app"
    UNKNOWN_SESSION: Final = "unknown_session"
    RATE_LIMITED: Final = "rate_limited"
    BUSY: Final = "busy"
    INTERNAL: Final = "internal"

    ALL: Final = (
        BAD_FRAME,
        BAD_REQUEST,
        UNKNOWN_OP,
        UNKNOWN_PROFILE,
        FORBIDDEN,
        NOT_LOGGED_IN,
        LOGIN_REQUIRED,
        INVALID_CREDENTIALS,
        UPSTREAM_UNAVAILABLE,
        UPSTREAM_ERROR,
        TIMEOUT,
        UNKNOWN_APP,
        UNKNOWN_SESSION,
        RATE_LIMITED,
        BUSY,
        INTERNAL,
    )


def is_number(value: object) -> TypeGuard[int | float]:
    """An int or a float, but not a bool (which Python counts as an int, msgpack does not)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


class FrameError(Exception):
    """A frame that cannot be read. The stream is out of step after it and must close."""


_packer = msgpack.Packer(autoreset=True, use_bin_type=True)
_ID_KEY: Final = _packer.pack("id")


def encode(message: Mapping[str, Any]) -> bytes:
    """One complete frame: the length prefix and the msgpack body."""
    body: bytes = _packer.pack(message)
    return _HEADER.pack(len(body)) + body


def error_body(code: str, message: str, retry_after: float | None = None) -> dict[str, Any]:
    """The `ok: false` fields of a response, without its id; `retry_after` (seconds)
    only where the code has one (`rate_limited`)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if retry_after is not None:
        error["retry_after"] = retry_after
    return {"ok": False, "error": error}


class PreparedResponse:
    """A response whose fields are encoded once and reused with any id.

    The daemon answers `token` from memory many thousand times per rotation; packing the
    same map each time is most of the cost of the answer, so the fields are packed once
    and each frame only packs its id in front of them.
    """

    __slots__ = ("_head", "_size", "_tail")

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._head: bytes = _packer.pack_map_header(len(fields) + 1) + _ID_KEY
        self._tail: bytes = b"".join(_packer.pack(k) + _packer.pack(v) for k, v in fields.items())
        self._size = len(self._head) + len(self._tail)

    def frame(self, request_id: int | None) -> bytes:
        packed_id: bytes = _packer.pack(request_id)
        return b"".join(
            (_HEADER.pack(self._size + len(packed_id)), self._head, packed_id, self._tail)
        )


class FrameDecoder:
    """Splits a byte stream into messages.

    `feed` returns every message completed by the new bytes, so a reader that received
    several pipelined requests in one read answers them all before reading again. A frame
    that cannot be read stops the decoder: the messages before it are returned, `error`
    says what was wrong, and later bytes are ignored (the peer is out of step).
    """

    __slots__ = ("_buffer", "_max_size", "error")

    def __init__(self, max_size: int = MAX_REQUEST_SIZE) -> None:
        self._buffer = bytearray()
        self._max_size = max_size
        self.error: FrameError | None = None

    def one(self, data: bytes) -> Message | None:
        """The message `data` holds when it is exactly one whole frame and nothing is
        buffered: the usual read, decoded without `feed`'s bookkeeping. None otherwise,
        with nothing taken: `feed` the same bytes then (a bad frame is recorded in
        `error` here already, and `feed` returns nothing after it)."""
        if self._buffer or self.error is not None or len(data) <= HEADER_SIZE:
            return None
        (size,) = _HEADER.unpack_from(data)
        if size + HEADER_SIZE != len(data) or size > self._max_size:
            return None
        try:
            return decode_body(data[HEADER_SIZE:])
        except FrameError as exc:
            self.error = exc
            return None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buffer)

    @property
    def complete(self) -> bool:
        """Whether a whole frame is buffered, waiting to be decoded."""
        buffer = self._buffer
        return (
            len(buffer) >= HEADER_SIZE
            and len(buffer) - HEADER_SIZE >= _HEADER.unpack_from(buffer)[0]
        )

    def feed(self, data: bytes = b"", most: int | None = None) -> list[Message]:
        """Take `data`; return the messages it completes, at most `most` of them.

        Frames beyond `most` stay buffered, undecoded, for the next call (with or
        without new data): a reader can bound the work, and the answers, per call.
        """
        if self.error is not None:
            return []
        if not self._buffer and len(data) > HEADER_SIZE:
            # The common case by far: exactly one whole frame per read.
            (size,) = _HEADER.unpack_from(data)
            if size + HEADER_SIZE == len(data) and size <= self._max_size:
                try:
                    return [decode_body(data[HEADER_SIZE:])]
                except FrameError as exc:
                    self.error = exc
                    return []
        if self._buffer:
            # The rare path: a frame was split across reads, or left over by `most`.
            self._buffer += data
            data = bytes(self._buffer)
            self._buffer.clear()
        messages: list[Message] = []
        offset, end, limit = 0, len(data), self._max_size
        while end - offset >= HEADER_SIZE and (most is None or len(messages) < most):
            (size,) = _HEADER.unpack_from(data, offset)
            if size > limit:
                self.error = FrameError(f"frame of {size} bytes is over the {limit} limit")
                return messages
            start = offset + HEADER_SIZE
            if end - start < size:
                break
            offset = start + size
            try:
                messages.append(decode_body(data[start:offset]))
            except FrameError as exc:
                self.error = exc
                return messages
        if offset < end:
            self._buffer += data[offset:]
        return messages


def decode_body(body: bytes) -> Message:
    """One frame's body as a message, or FrameError saying why it is not one."""
    if not body:
        raise FrameError("empty frame")
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        # ValueError covers truncated input, bad UTF-8 and non-string map keys.
        raise FrameError(f"frame is not one msgpack value ({type(exc).__name__})") from None
    if type(message) is not dict:
        raise FrameError(f"frame holds a msgpack {type(message).__name__}, not a map")
    for key in message:
        if type(key) is not str:
            raise FrameError("frame's map has keys that are not strings")
    return message
