"""A bearer kept in memory in three quarters of its size.

A JWT is three base64url segments joined by dots; the daemon holds one per live
session (about 800 characters from Geins), which is most of the 2 KiB a session may
cost. Kept as the decoded bytes of its segments instead, it takes a quarter less, and
it is rebuilt only when an answer is encoded (once per rotation while the session is
in use) or its claims are read.

Only a token that comes back exactly as it was is packed: three segments, unpadded,
canonical base64url (no stray bits, no characters `b64decode` would skip). Anything
else is kept as the string it was, so `unpack(pack(t)) == t` for every `t`.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

#: Segment lengths are two bytes each: a segment this long is not a Geins bearer.
_MAX_SEGMENT: Final = 0xFFFF


def pack(token: str) -> str | bytes:
    """`token` as its segments' bytes behind their lengths, or `token` itself."""
    parts = token.split(".")
    if len(parts) != 3:
        return token
    raw = []
    for part in parts:
        try:
            decoded = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (binascii.Error, ValueError):
            return token
        if len(decoded) > _MAX_SEGMENT or _encode(decoded) != part:
            return token
        raw.append(decoded)
    head = b"".join(len(segment).to_bytes(2, "big") for segment in raw[:2])
    return head + b"".join(raw)


def unpack(packed: str | bytes) -> str:
    """The token `pack` was given."""
    if isinstance(packed, str):
        return packed
    first = int.from_bytes(packed[0:2], "big")
    second = int.from_bytes(packed[2:4], "big")
    header, payload = packed[4 : 4 + first], packed[4 + first : 4 + first + second]
    signature = packed[4 + first + second :]
    return ".".join((_encode(header), _encode(payload), _encode(signature)))


def _encode(segment: bytes) -> str:
    return base64.urlsafe_b64encode(segment).rstrip(b"=").decode("ascii")
