"""The seam between fleet mode and the sealing layer: what goes into Redis is sealed.

Fleet mode needs two calls: `seal(profile, plaintext)` and `open(profile, blob)`, the
profile's name bound in as associated data, so a record copied to another profile's key
fails to open. The sealing layer proper (AES-256-GCM with current and previous keys,
key sources, rekey) belongs to the sealed-sessions work; `KeyFileSealer` below is the
interim implementation of this seam, with the same primitive, until it lands.
"""

from __future__ import annotations

import binascii
import os
import secrets
import stat
from pathlib import Path
from typing import Final, Protocol

_MAGIC: Final = b"GBF1"
_NONCE: Final = 12
_KEY_BYTES: Final = 32


class SealError(Exception):
    """A blob that does not open with our key (tampered, truncated, another profile's,
    another key's). Never says anything about the contents."""


class Sealer(Protocol):
    def seal(self, profile: str, plaintext: bytes) -> bytes: ...

    def open(self, profile: str, blob: bytes) -> bytes: ...


def _aad(profile: str) -> bytes:
    return _MAGIC + b"\0" + profile.encode()


class KeyFileSealer:
    """AES-256-GCM with a 32-byte key read from a private file (raw, or 64 hex digits)."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != _KEY_BYTES:
            raise ValueError("a sealing key is 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "KeyFileSealer(<key>)"

    @classmethod
    def from_file(cls, path: Path) -> KeyFileSealer:
        """Refused unless owned by this uid and unreadable by group and others."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ValueError(f"cannot open key file {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
                raise ValueError(f"key file {path} must be owned by this user and mode 0600")
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        text = raw.strip()
        if len(text) == 2 * _KEY_BYTES:
            try:
                return cls(binascii.unhexlify(text))
            except binascii.Error:
                pass
        if len(raw) == _KEY_BYTES:
            return cls(raw)
        raise ValueError(f"key file {path} holds no 32-byte key (raw, or 64 hex digits)")

    def seal(self, profile: str, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE)
        return _MAGIC + nonce + self._aead.encrypt(nonce, plaintext, _aad(profile))

    def open(self, profile: str, blob: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag

        if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + _NONCE + 16:
            raise SealError("not a sealed fleet record")
        nonce = blob[len(_MAGIC) : len(_MAGIC) + _NONCE]
        try:
            return self._aead.decrypt(nonce, blob[len(_MAGIC) + _NONCE :], _aad(profile))
        except InvalidTag:
            raise SealError(
                "the fleet record does not open with this key (another key, another "
                "profile's record, or tampered)"
            ) from None
