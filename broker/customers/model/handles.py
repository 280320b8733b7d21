"""Handles, and the two keys each one leads to.

A handle is 32 random bytes from `secrets`, in unpadded base64url (43 characters of
A-Z a-z 0-9 - _): safe in a URL, a cookie and a header as it is. It is shown once, to
the caller that created the session, and never kept, logged or stored.

From a handle the store derives two values that cannot be derived from each other:

- the session id, HMAC-SHA256 under the store key over the app and the handle. The
  store keys its rows by it; logs show `log_id`, its first 4 bytes in hex. The app is
  inside the MAC, so another app's handle is simply not found: one code path, one
  timing, for "unknown" and "not yours".
- the session key, HKDF-SHA256 over the handle (fixed salt, the app as info). Each
  record is encrypted under it, so the store file and the daemon's keys together open
  nothing without the handle. It does not involve the store key and the session id is
  not an input to it: knowing every id in the file gives no session key.

The store key is 32 random bytes kept in the store, sealed with the daemon's keyring
(so a key rotation re-seals it instead of changing every session id).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.core.secret import Secret

HANDLE_BYTES: Final = 32
#: len(base64url(32 bytes)) without padding.
HANDLE_LENGTH: Final = 43
STORE_KEY_SIZE: Final = 32
_HANDLE_ALPHABET: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
)
_SESSION_LABEL: Final = b"geins-broker customer session id v1\0"
_CUSTOMER_LABEL: Final = b"geins-broker customer id v1\0"
_KEY_SALT: Final = b"geins-broker customer session key v1"


def new_handle() -> Secret:
    """A fresh handle: 256 bits from the OS's CSPRNG."""
    return Secret(secrets.token_urlsafe(HANDLE_BYTES))


def well_formed(handle: str) -> bool:
    """Whether `handle` has a handle's shape (checked before any hashing, so a
    megabyte "handle" costs nothing). Says nothing about whether it exists."""
    return len(handle) == HANDLE_LENGTH and _HANDLE_ALPHABET.issuperset(handle)


def session_key(app: str, handle: Secret) -> bytes:
    """The key a session's record is encrypted under, known only to who holds the handle."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_KEY_SALT, info=app.encode())
    return hkdf.derive(handle.reveal().encode())


def log_id(session_id: bytes) -> str:
    """What logs and listings show of a session: 8 hex digits of its id."""
    return session_id[:4].hex()


@dataclass(frozen=True, slots=True)
class StoreKey:
    """The store's own MAC key; its repr shows nothing."""

    material: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.material) != STORE_KEY_SIZE:
            raise ValueError(f"a store key is {STORE_KEY_SIZE} bytes")

    @classmethod
    def generate(cls) -> StoreKey:
        return cls(secrets.token_bytes(STORE_KEY_SIZE))

    def session_id(self, app: str, handle: Secret) -> bytes:
        message = _SESSION_LABEL + app.encode() + b"\0" + handle.reveal().encode()
        return hmac.new(self.material, message, hashlib.sha256).digest()

    def customer_id(self, app: str, username: str) -> bytes:
        """Groups a customer's sessions (per-customer limit, "log out everywhere")
        without the username in clear beside them. Case-insensitive, as e-mail is."""
        message = _CUSTOMER_LABEL + app.encode() + b"\0" + username.casefold().encode()
        return hmac.new(self.material, message, hashlib.sha256).digest()
