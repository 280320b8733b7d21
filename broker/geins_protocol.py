"""The Geins auth protocol's fixed parts, as the official SDK speaks them.

Shared by the client (geins.py) and the emulator, so the two cannot disagree on a salt,
a header name or how a challenge is escaped. docs/geins-protocol.md (and
../shared/geins-auth-protocol.md) describe each field.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Final
from urllib.parse import quote

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

DEFAULT_NEW_USER: Final = {"newsletter": False, "customerType": "PERSON"}
CUSTOMER_TYPES: Final = ("PERSON", "ORGANIZATION")


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
