"""Sealing: a session's bytes encrypted and authenticated at rest, bytes in, bytes out.

Pure (no file, no clock): the file store uses it today, a network store (fleet mode)
will use the same layer, so a session sealed by one opens in the other.

A sealed blob is a small header followed by AES-256-GCM's output:

    b"GBSEAL" | version (1 byte) | key id (8 bytes) | nonce (12 bytes) | ciphertext+tag

- The nonce is random per seal (96 bits from the OS): a key seals far fewer than the
  2**32 messages after which random nonces start to risk a collision.
- The associated data is the header's first 15 bytes (magic, version, key id) and the
  profile's name: a blob copied to another profile, given another key id, or cut short
  fails to open, exactly as one with a flipped bit does.
- The key id is the first 8 bytes of SHA-256 over a fixed label and the key: it says
  which key sealed a blob without revealing anything about that key.

A blob without the magic is a session in clear (the format before sealing, or with no
key configured): `open` returns it as is and says it wants re-sealing if a key is now
configured. A blob with the magic, even a damaged one, never passes as clear.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC: Final = b"GBSEAL"
VERSION: Final = 1
KEY_SIZE: Final = 32
KEY_ID_SIZE: Final = 8
NONCE_SIZE: Final = 12
_TAG_SIZE: Final = 16
_HEADER: Final = len(MAGIC) + 1 + KEY_ID_SIZE
_KEY_ID_LABEL: Final = b"geins-broker key id v1\0"


class SealError(Exception):
    """A sealed blob that does not open. Never carries key material or plaintext."""


class KeyMissing(SealError):
    """Sealed with a key this keyring does not hold: bring the key back, nothing is lost."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"sealed with key {key_id}, which is not configured")
        self.key_id = key_id


class Tampered(SealError):
    """The key is here but the blob does not open: changed, cut short, or another
    profile's."""


@dataclass(frozen=True, slots=True)
class Key:
    """A 256-bit key; its repr names only its id."""

    material: bytes = field(repr=False)
    id: bytes = field(init=False)
    _aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.material) != KEY_SIZE:
            raise ValueError(f"a key is {KEY_SIZE} bytes, not {len(self.material)}")
        digest = hashlib.sha256(_KEY_ID_LABEL + self.material).digest()
        object.__setattr__(self, "id", digest[:KEY_ID_SIZE])
        object.__setattr__(self, "_aead", AESGCM(self.material))

    @classmethod
    def generate(cls) -> Key:
        return cls(AESGCM.generate_key(bit_length=KEY_SIZE * 8))

    @property
    def name(self) -> str:
        """The id as operators see it (logs, status, errors)."""
        return self.id.hex()


@dataclass(frozen=True, slots=True)
class Opened:
    data: bytes
    #: Not sealed with the current key (in clear, or with a previous key): seal again.
    stale: bool
    #: The key that opened it; None for a blob in clear.
    key: Key | None


@dataclass(frozen=True, slots=True)
class Keyring:
    """The current key (None: sessions are kept in clear) and the previous ones, which
    still open what they sealed until every blob has been sealed again."""

    current: Key | None = None
    previous: tuple[Key, ...] = ()

    @property
    def sealing(self) -> bool:
        return self.current is not None

    def describe(self) -> str:
        """One line for the start-up log and `status`."""
        if self.current is None:
            return "off: no key configured, sessions are stored in clear"
        extra = "".join(f", opens key {k.name}" for k in self.previous)
        return f"on: key {self.current.name}{extra}"

    def seal(self, profile: str, data: bytes) -> bytes:
        """`data` sealed with the current key, or as is when there is none."""
        key = self.current
        if key is None:
            return data
        header = MAGIC + bytes([VERSION]) + key.id
        nonce = os.urandom(NONCE_SIZE)
        return header + nonce + key._aead.encrypt(nonce, data, _aad(header, profile))

    def open(self, profile: str, blob: bytes) -> Opened:
        """The bytes `seal` was given for this profile. Raises KeyMissing or Tampered."""
        if blob[: len(MAGIC)] != MAGIC:
            if not is_sealed(blob):
                return Opened(blob, stale=self.current is not None, key=None)
            if len(blob) >= _HEADER + NONCE_SIZE + _TAG_SIZE:
                raise Tampered("a sealed session whose header was changed")
        if len(blob) < _HEADER + NONCE_SIZE + _TAG_SIZE:
            raise Tampered("a sealed session cut short")
        if blob[len(MAGIC)] != VERSION:
            raise Tampered(f"sealed in format {blob[len(MAGIC)]}, which this version cannot read")
        key_id = blob[len(MAGIC) + 1 : _HEADER]
        key = self._find(key_id)
        if key is None:
            raise KeyMissing(key_id.hex())
        view = memoryview(blob)
        header, nonce = blob[:_HEADER], view[_HEADER : _HEADER + NONCE_SIZE]
        try:
            data = key._aead.decrypt(nonce, view[_HEADER + NONCE_SIZE :], _aad(header, profile))
        except InvalidTag:
            raise Tampered(
                f"does not open with key {key.name}: changed, cut short, or another profile's"
            ) from None
        return Opened(data, stale=key is not self.current, key=key)

    def _find(self, key_id: bytes) -> Key | None:
        for key in (self.current, *self.previous):
            if key is not None and key.id == key_id:
                return key
        return None


def is_sealed(blob: bytes) -> bool:
    """Whether `blob` is (or was, before damage) sealed: the magic, give or take two
    changed bytes, or a stub of it. A session in clear is JSON and starts with `{`, so
    a sealed file whose header took a hit is still refused, not taken for one in clear."""
    head = blob[: len(MAGIC)]
    if len(head) < len(MAGIC):
        return bool(head) and MAGIC.startswith(head)
    return sum(a == b for a, b in zip(head, MAGIC, strict=True)) >= len(MAGIC) - 2


def sealed_key_id(blob: bytes) -> str | None:
    """The id of the key a blob was sealed with (hex), None for one in clear."""
    if not blob.startswith(MAGIC) or len(blob) < _HEADER:
        return None
    return blob[len(MAGIC) + 1 : _HEADER].hex()


def _aad(header: bytes, profile: str) -> bytes:
    return header + b"\0" + profile.encode()
