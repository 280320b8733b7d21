"""The Geins auth protocol's values, as the official SDK speaks them. Pure: no I/O.

Shared by the HTTP client (client.py) and the emulator, so the two cannot disagree on a
salt, a header name, how a challenge is escaped or what a grant holds. The reference is
the official SDK's auth service client (@geins/core, `authServiceClient.ts`); each value
below says which part of the exchange it is.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import math
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

from broker.core.secret import Secret

#: The fixed public salt the SDK appends to every password before hashing it.
PASSWORD_SALT: Final = "Dd1dfLonNy6Am2fXQl2AcoI+IbhLhXvaibnDNn8uEa6vbJ05eyJajSuGFm9uQSmD"  # noqa: S105 - public, fixed by the protocol

#: The refresh token travels in this header, in requests and in responses.
REFRESH_HEADER: Final = "x-auth-refresh-token"
API_KEY_HEADER: Final = "x-apikey"

DEFAULT_AUTH_SERVICE_URL: Final = "https://auth-service.geins.io"
DEFAULT_MERCHANT_API_URL: Final = "https://merchantapi.geins.io"

#: What the SDK sends as `sessionLifetime` when the user does not ask to be remembered.
SHORT_SESSION_MINUTES: Final = 30

#: The SDK's per-request timeout.
REQUEST_TIMEOUT: Final = 10.0

USER_CREATE_MUTATION: Final = (
    "mutation UserCreate($user: UserInputType!, $channelId: String, $languageId: String, "
    "$marketId: String) { updateUser(user: $user, channelId: $channelId, "
    "languageId: $languageId, marketId: $marketId) { email } }"
)

CUSTOMER_TYPES: Final = ("PERSON", "ORGANIZATION")
DEFAULT_CUSTOMER_TYPE: Final = CUSTOMER_TYPES[0]
DEFAULT_NEW_USER: Final = {"newsletter": False, "customerType": DEFAULT_CUSTOMER_TYPE}


def password_digest(password: str) -> str:
    """base64(SHA-384(utf8(password + salt))): the only form a password leaves in."""
    hashed = hashlib.sha384((password + PASSWORD_SALT).encode()).digest()
    return base64.b64encode(hashed).decode("ascii")


def encode_uri_component(text: str) -> str:
    """JavaScript's encodeURIComponent: everything but A-Z a-z 0-9 - _ . ! ~ * ' ( )."""
    return quote(text, safe="-_.!~*'()")


def auth_path(account: str, environment: str) -> str:
    """The auth service's path prefix, e.g. `/api/myshop_prod`."""
    return f"/api/{account}_{environment}"


def sign_path(api_key: str) -> str:
    """The signature service's path; the escaped challenge follows `?identity=`."""
    return f"/auth/sign/{api_key}"


GRAPHQL_PATH: Final = "/graphql"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one profile's Geins account lives."""

    account: str
    api_key: str = field(repr=False)
    environment: str = "prod"
    auth_service_url: str = DEFAULT_AUTH_SERVICE_URL
    merchant_api_url: str = DEFAULT_MERCHANT_API_URL
    channel_id: str | None = None
    language_id: str | None = None
    market_id: str | None = None

    @property
    def auth_base(self) -> str:
        return self.auth_service_url.rstrip("/") + auth_path(self.account, self.environment)

    @property
    def sign_base(self) -> str:
        return self.merchant_api_url.rstrip("/") + sign_path(self.api_key) + "?identity="

    @property
    def graphql_url(self) -> str:
        return self.merchant_api_url.rstrip("/") + GRAPHQL_PATH


@dataclass(frozen=True, slots=True)
class Grant:
    """What a successful login, refresh, password change or register hands back."""

    bearer: Secret
    refresh: Secret
    #: Seconds the session (the refresh token) lasts, as Geins states it; None if it did not.
    max_age: int | None


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A Retry-After header (delta-seconds or HTTP-date) as seconds from now.

    None for anything else, including a number too large to be finite: the caller caps
    what it gets (session.py), so only values that are not a time at all are dropped.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes "²", which float refuses
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
        seconds = when.timestamp() - now
    except (TypeError, ValueError, OverflowError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
