"""A customer session's record: what the store keeps, sealed twice.

    outer = keyring.seal(label, inner)          the daemon's keyring (core/sealing.py)
    inner = b"GBCS" | 1 | nonce | AES-256-GCM(session key, payload)

The inner layer's associated data is the app and the session id, the outer seal's
label names them too: a record copied to another row or another app does not open.
The payload (msgpack) holds everything the session is, including its generation and
commit time: nothing about a session's freshness is read from outside the seals.

Without the handle there is no session key (handles.py), so a copy of the store with
the daemon's keys opens nothing. The username beside a record, for admin listings, is
sealed with the keyring alone (`seal_name`): an operator with the keys may list who
has sessions, and still cannot use one.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.core.sealing import Keyring, SealError
from broker.core.secret import Secret
from broker.customers.model.errors import RecordUnreadable

INNER_MAGIC: Final = b"GBCS"
INNER_VERSION: Final = 1
_NONCE: Final = 12
_TAG: Final = 16
_HEAD: Final = len(INNER_MAGIC) + 1
#: A record is about 1.5 KB (a JWT and a refresh token); anything this big is not one.
MAX_RECORD: Final = 128 * 1024
_FIELDS: Final = 12


@dataclass(frozen=True, slots=True)
class SessionRecord:
    app: str
    username: str
    remember: bool
    bearer: Secret = field(repr=False)
    refresh: Secret = field(repr=False)
    #: Wall time the bearer was received, and when it expires.
    obtained_at: float
    expires_at: float
    #: When the refresh token runs out (Geins' maxAge); None if Geins did not say.
    session_ends_at: float | None
    created_at: float
    #: Bumped by every commit of this session; a record never replaces a newer one.
    generation: int
    committed_at: float


def _aad(app: str, session_id: bytes) -> bytes:
    return INNER_MAGIC + b"\0" + app.encode() + b"\0" + session_id


def _label(kind: str, app: str, session_id: bytes) -> str:
    return f"customer-{kind}/{app}/{session_id.hex()}"


def seal(record: SessionRecord, keyring: Keyring, session_id: bytes, key: bytes) -> bytes:
    payload = msgpack.packb(
        [
            record.app,
            record.username,
            record.remember,
            record.bearer.reveal(),
            record.refresh.reveal(),
            record.obtained_at,
            record.expires_at,
            record.session_ends_at,
            record.created_at,
            record.generation,
            record.committed_at,
            INNER_VERSION,
        ],
        use_bin_type=True,
    )
    nonce = os.urandom(_NONCE)
    sealed = AESGCM(key).encrypt(nonce, payload, _aad(record.app, session_id))
    inner = INNER_MAGIC + bytes([INNER_VERSION]) + nonce + sealed
    return keyring.seal(_label("session", record.app, session_id), inner)


def open_record(
    blob: bytes, keyring: Keyring, app: str, session_id: bytes, key: bytes
) -> tuple[SessionRecord, bool]:
    """The record, and whether it wants re-sealing (sealed with a previous daemon key).

    Raises RecordUnreadable for anything that does not open or parse: the wrong
    handle, another row's or app's record, a changed byte, a missing daemon key."""
    if len(blob) > MAX_RECORD:
        raise RecordUnreadable("a stored session larger than any session")
    try:
        opened = keyring.open(_label("session", app, session_id), blob)
    except SealError as exc:
        raise RecordUnreadable(str(exc)) from None
    inner = opened.data
    if len(inner) < _HEAD + _NONCE + _TAG or inner[: len(INNER_MAGIC)] != INNER_MAGIC:
        raise RecordUnreadable("a stored session that is not a customer session")
    if inner[len(INNER_MAGIC)] != INNER_VERSION:
        raise RecordUnreadable("a stored session in a format this version cannot read")
    nonce = inner[_HEAD : _HEAD + _NONCE]
    try:
        payload = AESGCM(key).decrypt(nonce, inner[_HEAD + _NONCE :], _aad(app, session_id))
    except InvalidTag:
        raise RecordUnreadable("a stored session that does not open with this handle") from None
    return _parse(payload, app), opened.stale


def _parse(payload: bytes, app: str) -> SessionRecord:
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise RecordUnreadable("a stored session that does not parse") from None
    if not isinstance(fields, list) or len(fields) != _FIELDS:
        raise RecordUnreadable("a stored session with the wrong fields")
    (rapp, username, remember, bearer, refresh, obtained, expires, ends, created, gen, at, _v) = (
        fields
    )
    texts_ok = all(isinstance(v, str) and v for v in (rapp, username, bearer, refresh))
    times = (obtained, expires, created, at) + (() if ends is None else (ends,))
    if (
        not texts_ok
        or rapp != app
        or not isinstance(remember, bool)
        or not all(_is_time(t) for t in times)
        or isinstance(gen, bool)
        or not isinstance(gen, int)
        or gen < 0
    ):
        raise RecordUnreadable("a stored session with fields of the wrong kind")
    return SessionRecord(
        app=rapp,
        username=username,
        remember=remember,
        bearer=Secret(bearer),
        refresh=Secret(refresh),
        obtained_at=float(obtained),
        expires_at=float(expires),
        session_ends_at=None if ends is None else float(ends),
        created_at=float(created),
        generation=gen,
        committed_at=float(at),
    )


def _is_time(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 <= value < 253_402_300_800
    )


def seal_name(keyring: Keyring, app: str, session_id: bytes, username: str) -> bytes:
    """The username kept beside a record for admin listings (keyring only)."""
    return keyring.seal(_label("name", app, session_id), username.encode())


def open_name(keyring: Keyring, app: str, session_id: bytes, blob: bytes) -> str | None:
    """The username beside a record, or None when it does not open."""
    try:
        return keyring.open(_label("name", app, session_id), blob).data.decode()
    except (SealError, UnicodeDecodeError):
        return None
