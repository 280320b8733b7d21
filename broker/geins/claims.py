"""Reading a Geins bearer token's claims the way the official SDK does.

Nothing is verified: the broker holds no key, and Geins checks its own tokens. The
payload's keys may be namespaced URIs
(`http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name`); like the SDK, a key is
shortened to its last `/`-separated segment with the first letter lowercased, and every
value is read as a string. The token itself never appears in an error message.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any


class NotAJwt(ValueError):
    """The bearer is not three dot-separated parts with a JSON object in the middle."""


@dataclass(frozen=True, slots=True)
class Claims:
    exp: int
    iat: int | None
    user_id: str
    username: str
    customer_type: str
    member_type: str
    member_id: str
    member_discount: str
    #: Geins marks a token that no longer authenticates with an `expired` claim.
    expired: bool


def short_key(key: str) -> str:
    last = key.rsplit("/", 1)[-1] or key
    return last[:1].lower() + last[1:]


def _as_text(value: Any) -> str:
    if isinstance(value, list):
        # The SDK writes each element as its own key=value pair; the last one wins.
        return _as_text(value[-1]) if value else ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def payload(token: str) -> dict[str, str]:
    """The payload's claims with shortened keys and string values."""
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        raise NotAJwt(f"bearer token has {len(parts)} dot-separated parts, a JWT has 3")
    segment = parts[1]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise NotAJwt(
            f"bearer token payload is not base64url JSON ({type(exc).__name__})"
        ) from None
    if not isinstance(decoded, dict):
        raise NotAJwt("bearer token payload is not a JSON object")
    return {short_key(str(k)): _as_text(v) for k, v in decoded.items()}


def _int_claim(claims: dict[str, str], name: str) -> int | None:
    text = claims.get(name)
    if text is None:
        return None
    try:
        return int(float(text))
    except (ValueError, OverflowError):  # not a number, or inf/nan
        raise NotAJwt(f"bearer token claim {name!r} is not a finite number") from None


def decode(token: str) -> Claims:
    """The claims the broker uses; a token without a numeric `exp` is refused."""
    claims = payload(token)
    exp = _int_claim(claims, "exp")
    if exp is None:
        raise NotAJwt("bearer token has no exp claim")
    return Claims(
        exp=exp,
        iat=_int_claim(claims, "iat"),
        user_id=claims.get("sid", ""),
        username=claims.get("name", "unknown"),
        customer_type=claims.get("customerType", "unknown").upper(),
        member_type=claims.get("memberType", "unknown"),
        member_id=claims.get("memberId", "0"),
        member_discount=claims.get("memberDiscount", "0"),
        expired="expired" in claims,
    )
