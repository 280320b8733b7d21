"""Where the sealing keys come from, in order, and what a key file must look like.

1. The systemd credential `$CREDENTIALS_DIRECTORY/geins-broker.key` (the units load it
   with LoadCredentialEncrypted=, decrypted by systemd into the unit's private,
   unswappable credentials directory). The units also set `SetCredential=
   geins-broker.key:none` as a default, because on systemd 252 a LoadCredential= whose
   file is missing fails the unit unless a SetCredential= of the same name stands in;
   that stand-in, the text `none`, means "no credential" here.
2. `key_file` in the config: refused unless it is a regular file owned by the daemon's
   uid with mode 0600 or stricter (0400), in a directory reached as the state directory
   is (statedir.open_trusted_dir): every directory on the way owned by root or the
   daemon's uid and writable by no one else (unless sticky), no link another uid made,
   the directory itself no link. Whoever could write that directory could delete the
   key (a crash loop under Restart=) or swap `key_file` and `previous_key_file`.
3. Nothing: sessions are stored in clear, as before sealing existed; the start-up log
   and `status` say so.

`previous_key_file` adds a key that still opens what it sealed (rotation); it is held
to the same rules as `key_file`.

A key is 32 random bytes written as one line of base64 (`geins-broker key generate`).
Errors are ConfigError, one line naming the file: the daemon exits 2 at start, and a
reload that meets one keeps the keys it has.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from broker.core.errors import StateDirError
from broker.core.sealing import KEY_SIZE, Key, Keyring
from broker.daemon.config import BrokerConfig, ConfigError
from broker.storage.statedir import open_trusted_dir

CREDENTIAL_NAME: Final = "geins-broker.key"
#: What the units' SetCredential= default holds: no key from systemd.
CREDENTIAL_UNSET: Final = b"none"
_MAX_KEY_FILE: Final = 4096


def load_keyring(
    config: BrokerConfig, environ: Mapping[str, str] | None = None
) -> tuple[Keyring, str]:
    """The keys `config` names, and where the current one came from (for the log)."""
    env = os.environ if environ is None else environ
    current, source = None, "none"
    if creds := env.get("CREDENTIALS_DIRECTORY"):
        path = Path(creds) / CREDENTIAL_NAME
        raw = _read_credential(path)
        if raw is not None and raw.strip() != CREDENTIAL_UNSET:
            current, source = parse_key(raw, path), f"credential {path}"
    if current is None and config.key_file is not None:
        current, source = read_key_file(config.key_file), f"key_file {config.key_file}"
    previous: tuple[Key, ...] = ()
    if config.previous_key_file is not None:
        old = read_key_file(config.previous_key_file)
        if current is None or old.id != current.id:
            previous = (old,)
    return Keyring(current, previous), source


def _read_credential(path: Path) -> bytes | None:
    """A credential systemd wrote (it owns its mode and owner); None if absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        return os.read(fd, _MAX_KEY_FILE)
    finally:
        os.close(fd)


def read_key_file(path: Path) -> Key:
    """A key file of ours: the daemon's own, 0600 or stricter, never through a link, in a
    directory nobody else can write."""
    path = Path(os.path.abspath(path))
    try:
        directory = open_trusted_dir(path.parent)
    except StateDirError as exc:
        raise ConfigError(f"{path}: refused, as {exc}") from None
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(path.name, flags, dir_fd=directory)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    finally:
        os.close(directory)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if info.st_uid != os.geteuid():
            raise ConfigError(
                f"{path}: owned by uid {info.st_uid}; a key file must be the daemon's own "
                f"(uid {os.geteuid()})"
            )
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o177:
            raise ConfigError(f"{path}: mode {mode:04o}; a key file must be 0600 or stricter")
        raw = os.read(fd, _MAX_KEY_FILE)
    finally:
        os.close(fd)
    return parse_key(raw, path)


def parse_key(raw: bytes, origin: Path) -> Key:
    problem = f"{origin}: not a geins-broker key (one line of base64 holding {KEY_SIZE} bytes"
    problem += ", as `geins-broker key generate` writes)"
    try:
        material = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(problem) from None
    if len(material) != KEY_SIZE:
        raise ConfigError(problem)
    return Key(material)


def encode_key(key: Key) -> bytes:
    return base64.b64encode(key.material) + b"\n"
