"""Minting and checking the emulator's bearer tokens (HS256 JWTs).

The claims are namespaced the way Geins namespaces them, so the broker's claim decoding
is exercised on the real shape, not on tidy short keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Final

IDENTITY_NS: Final = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/"
GEINS_NS: Final = "http://schemas.geins.io/identity/claims/"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def geins_claims(
    *,
    user_id: str,
    username: str,
    customer_type: str,
    issued_at: int,
    expires_at: int,
    token_id: str,
    issuer: str,
    audience: str,
) -> dict[str, Any]:
    return {
        IDENTITY_NS + "sid": user_id,
        IDENTITY_NS + "name": username,
        GEINS_NS + "customerType": customer_type,
        GEINS_NS + "memberType": "Standard",
        GEINS_NS + "memberId": user_id,
        GEINS_NS + "memberDiscount": "0",
        "jti": token_id,
        "nbf": issued_at,
        "iat": issued_at,
        "exp": expires_at,
        "iss": issuer,
        "aud": audience,
    }


def mint(claims: dict[str, Any], key: bytes) -> str:
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = _b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def verify(token: str, key: bytes) -> dict[str, Any] | None:
    """The claims of a token this key signed, else None. Expiry is the caller's check."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
    expected = _b64(hmac.new(key, signing_input, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, parts[2]):
        return None
    try:
        claims = json.loads(_unb64(parts[1]))
    except ValueError:
        return None
    return claims if isinstance(claims, dict) else None
