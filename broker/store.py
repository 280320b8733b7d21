"""Sessions on disk: one private file per profile, replaced atomically.

A write goes to a fresh temporary file in the same directory (0600, O_EXCL), is
fsynced, renamed over the old file, and the directory is fsynced, so after a crash at
any instant the file is either the old session or the new one, never a mix. The
directory is 0700. The calls block (fsync), so the daemon runs them in a worker thread.

A file that cannot be read back is set aside under a `.corrupt-<time>` name, logged by
the caller, and its profile starts logged out; the other profiles are unaffected.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .errors import StoreError
from .secret import Secret

FORMAT: Final = 1
SUFFIX: Final = ".session.json"
_TMP_PREFIX: Final = ".tmp-"


class CorruptState(Exception):
    """A state file that is not a session; `set_aside` says where it went."""

    def __init__(self, message: str, set_aside: Path | None) -> None:
        super().__init__(message)
        self.set_aside = set_aside


@dataclass(frozen=True, slots=True)
class Record:
    """What survives a restart of one profile's session."""

    username: str | None
    remember: bool = False
    refresh: Secret | None = field(default=None, repr=False)
    bearer: Secret | None = field(default=None, repr=False)
    obtained_at: float | None = None
    expires_at: float | None = None
    session_expires_at: float | None = None
    login_required: bool = False
    last_refresh_at: float | None = None
    refreshes: int = 0

    def to_json(self, profile: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "profile": profile,
            "username": self.username,
            "remember": self.remember,
            "refresh_token": None if self.refresh is None else self.refresh.reveal(),
            "token": None if self.bearer is None else self.bearer.reveal(),
            "obtained_at": self.obtained_at,
            "expires_at": self.expires_at,
            "session_expires_at": self.session_expires_at,
            "login_required": self.login_required,
            "last_refresh_at": self.last_refresh_at,
            "refreshes": self.refreshes,
        }

    @classmethod
    def from_json(cls, data: Any, profile: str) -> Record:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a version 1 session")
        if data.get("profile") != profile:
            raise ValueError(f"saved for profile {data.get('profile')!r}")
        refresh, bearer = data.get("refresh_token"), data.get("token")
        record = cls(
            username=_typed(data, "username", str, optional=True),
            remember=_typed(data, "remember", bool),
            refresh=None if refresh is None else Secret(_typed(data, "refresh_token", str)),
            bearer=None if bearer is None else Secret(_typed(data, "token", str)),
            obtained_at=_number(data, "obtained_at"),
            expires_at=_number(data, "expires_at"),
            session_expires_at=_number(data, "session_expires_at"),
            login_required=_typed(data, "login_required", bool),
            last_refresh_at=_number(data, "last_refresh_at"),
            refreshes=_typed(data, "refreshes", int),
        )
        if record.bearer is not None and (record.obtained_at is None or record.expires_at is None):
            raise ValueError("a token without its times")
        return record


def _typed(data: dict[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    value = data.get(key)
    if (value is None and optional) or (
        isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    ):
        return value
    raise ValueError(f"{key} is not a {kind.__name__}")


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} is not a number")
    return float(value)


class Store:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, profile: str) -> Path:
        return self.directory / f"{profile}{SUFFIX}"

    def prepare(self) -> list[Path]:
        """Create the directory 0700 (tightening an existing one) and sweep stale temps.

        Returns the temporary files a crash left behind, now removed.
        """
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if stat.S_IMODE(self.directory.stat().st_mode) & 0o077:
                self.directory.chmod(0o700)
            stale = list(self.directory.glob(f"{_TMP_PREFIX}*"))
            for leftover in stale:
                leftover.unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"state directory {self.directory}: {exc.strerror}") from None
        return stale

    def load(self, profile: str) -> Record | None:
        path = self.path(profile)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        try:
            return Record.from_json(json.loads(raw), profile)
        except (ValueError, UnicodeDecodeError) as exc:
            reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not JSON"
            raise CorruptState(f"{path}: {reason}", self._set_aside(path)) from None

    def _set_aside(self, path: Path) -> Path | None:
        target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path, target)
        except OSError:
            return None
        return target

    def save(self, profile: str, record: Record) -> None:
        data = json.dumps(record.to_json(profile), indent=1).encode() + b"\n"
        self._replace(self.path(profile), data)

    def delete(self, profile: str) -> None:
        path = self.path(profile)
        try:
            path.unlink(missing_ok=True)
            self._sync_directory()
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {exc.strerror}") from None

    def _replace(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileExistsError:  # left by a write this process abandoned
                tmp.unlink()
                fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_directory()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
