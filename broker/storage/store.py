"""Sessions on disk: one private file per profile, replaced atomically.

A write goes to a fresh temporary file in the same directory (0600, O_EXCL), is
fsynced, renamed over the old file, and the directory is fsynced, so after a crash at
any instant the file is either the old session or the new one, never a mix. The
directory is 0700, opened once through statedir.py (no link, no other uid's directory)
and locked for the life of the process; every file is opened relative to its fd with
O_NOFOLLOW. The calls block (fsync), so the daemon runs them in a worker thread.

A file that cannot be read back is set aside under a `.corrupt-<time>` name, logged by
the caller, and its profile starts logged out; the other profiles are unaffected.

With a key (see sealing.py and keys.py) each file is sealed: its bytes are the sealed
JSON, under the same name, so a store moves from clear to sealed one write at a time.
A sealed file that does not open (its key missing, or the file changed) is the one
exception to setting aside: it is left exactly as it is, byte for byte, and its profile
reports `sealed` until the key comes back.

Freshness (freshness.py): with a key, each file carries a generation inside its seal,
one more at each write, and the directory's sealed high-water file keeps the highest;
a sealed file below it (an older copy put back) is refused and set aside. A file in
clear while a key is set is refused once `rekey` has run (`clear_sessions`, default
`after_rekey`), and accepted with a warning before.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from broker.core.errors import StateDirError, StoreError
from broker.core.sealing import Keyring, SealError, sealed_key_id
from broker.core.secret import Secret
from broker.observe.log import events
from broker.storage import freshness
from broker.storage.freshness import Marks
from broker.storage.statedir import lock, open_private_dir

log = events("broker.store")

FORMAT: Final = 1
SUFFIX: Final = ".session.json"
_TMP_PREFIX: Final = ".tmp-"
#: A session is a few kilobytes; anything this big is not one.
MAX_FILE_SIZE: Final = 1 << 20
#: The `clear_sessions` setting: what a session file in clear is worth once a key is set.
CLEAR_SESSIONS: Final = ("after_rekey", "refuse", "accept")


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


def _is_session_file(name: str) -> bool:
    return name.endswith(SUFFIX) and not name.startswith(".") and len(name) > len(SUFFIX)


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


class SealedState(Exception):
    """A sealed file that does not open with the keys configured. It is left exactly as
    it is (never rewritten, moved or deleted) until a reload brings its key."""

    def __init__(self, message: str, key_id: str | None) -> None:
        super().__init__(message)
        self.key_id = key_id


class Store:
    """The sessions of one state directory, each file opened relative to the
    directory's fd (see statedir.py): `prepare` first, `close` at the end.

    Each file's bytes go through `keyring` (sealing.py): sealed with its current key,
    or in clear when it has none. A file that does not open stays untouched: `save`
    and `delete` refuse that profile until a `load` with the right key succeeds.
    """

    def __init__(
        self,
        directory: Path,
        keyring: Keyring | None = None,
        clear_sessions: str = "after_rekey",
    ) -> None:
        self.directory = directory
        #: Replaced on reload; a write uses the keyring of the moment.
        self.keyring = keyring or Keyring()
        if clear_sessions not in CLEAR_SESSIONS:
            raise ValueError(f"clear_sessions is one of {', '.join(CLEAR_SESSIONS)}")
        self.clear_sessions = clear_sessions
        #: The high-water marks, read at the first use with a key. Writes of different
        #: profiles run in worker threads at once; the one marks file is not theirs
        #: to race on, so reading and replacing it is serialised.
        self._marks: Marks | None = None
        self._marks_lock = threading.RLock()
        #: Profiles whose file would not open, and why: not to be overwritten.
        self.unopened: dict[str, str] = {}
        #: Profiles whose file is in clear or under a previous key, while a key is set.
        self.stale: set[str] = set()
        self._fd: int | None = None
        self._lock: int | None = None

    def path(self, profile: str) -> Path:
        return self.directory / f"{profile}{SUFFIX}"

    @property
    def _dir(self) -> int:
        if self._fd is None:
            raise StoreError(f"{self.directory}: not prepared")
        return self._fd

    def prepare(self) -> list[Path]:
        """Open the directory safely (creating it 0700), take its lock for the life of
        this process, and sweep the temporaries a crash left behind (returned).

        Raises StateDirError, with a one-line reason naming the path, when the
        directory cannot be trusted or another process holds the lock.
        """
        if self._fd is None:
            fd = open_private_dir(self.directory)
            try:
                self._lock = lock(fd, self.directory)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        try:
            stale = [n for n in os.listdir(self._dir) if n.startswith(_TMP_PREFIX)]
            for name in stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=self._dir)
        except OSError as exc:
            raise StateDirError(f"{self.directory}: {exc.strerror}") from None
        return [self.directory / name for name in stale]

    def close(self) -> None:
        """Let go of the directory and its lock."""
        for fd in (self._lock, self._fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock = None

    def load(self, profile: str) -> Record | None:
        """The saved session; None if there is none. Raises SealedState (file kept),
        CorruptState (file set aside) or StoreError (cannot read)."""
        path = self.path(profile)
        try:
            raw = self._read(path.name)
        except FileNotFoundError:
            self.unopened.pop(profile, None)
            return None
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        try:
            opened = self.keyring.open(profile, raw)
        except SealError as exc:
            reason = f"{path}: {exc}"
            if not self.keyring.sealing:
                reason += "; no key is configured"
            self.unopened[profile] = reason
            raise SealedState(reason, sealed_key_id(raw)) from None
        self.unopened.pop(profile, None)
        try:
            data = json.loads(opened.data)
            record = Record.from_json(data, profile)
        except (ValueError, UnicodeDecodeError) as exc:
            reason = str(exc) if not isinstance(exc, json.JSONDecodeError) else "not JSON"
            raise CorruptState(f"{path}: {reason}", self._set_aside(path)) from None
        if self.keyring.sealing:
            self._check_fresh(profile, path, data, sealed=opened.key is not None)
        if opened.stale:
            self.stale.add(profile)
        else:
            self.stale.discard(profile)
        return record

    def _check_fresh(self, profile: str, path: Path, data: Any, *, sealed: bool) -> None:
        """Refuse (set aside) a file in clear once clear files are refused, or a sealed
        file older than the high-water mark; raise the mark to a newer one."""
        marks = self.marks()
        if not sealed:
            if self._refuses_clear(marks):
                log.error("session_in_clear_refused", profile=profile, path=path)
                raise CorruptState(
                    f"{path}: a session in clear while a key is set (clear_sessions = "
                    f"{self.clear_sessions!r}); refused",
                    self._set_aside(path),
                )
            log.warning(
                "session_in_clear",
                profile=profile,
                path=path,
                why="accepted while a key is set, until `geins-broker rekey` has run",
            )
            return
        generation, highest = freshness.sealed_generation(data), marks.get(profile)
        if highest is not None and (generation is None or generation < highest):
            log.error(
                "session_rolled_back", profile=profile, generation=generation, highest=highest
            )
            raise CorruptState(
                f"{path}: generation {generation} is older than the {highest} this "
                "directory has had (a copy put back); refused",
                self._set_aside(path),
            )
        if generation is not None and (highest is None or generation > highest):
            self._raise_mark(profile, generation)

    def _refuses_clear(self, marks: Marks) -> bool:
        if self.clear_sessions == "after_rekey":
            return marks.rekeyed
        return self.clear_sessions == "refuse"

    def marks(self) -> Marks:
        """The high-water marks (read once; sealed, so only this daemon's keys write
        them). Missing: none yet. Unreadable: none, and clear files refused."""
        with self._marks_lock:
            return self._read_marks()

    def _read_marks(self) -> Marks:
        if self._marks is not None:
            return self._marks
        try:
            self._marks = freshness.decode(self.keyring, self._read(freshness.NAME))
        except FileNotFoundError:
            self._marks = Marks()
        except (OSError, SealError, ValueError, UnicodeDecodeError) as exc:
            log.error(
                "high_water_unreadable",
                path=self.directory / freshness.NAME,
                reason=str(exc),
                why="rolled-back files cannot be told until each profile is written again",
            )
            self._marks = Marks(rekeyed=True)
        return self._marks

    def _raise_mark(self, profile: str, generation: int) -> None:
        with self._marks_lock:
            self._write_marks(self._read_marks().raised(profile, generation))

    def _write_marks(self, marks: Marks) -> None:
        """Replace the marks file (the caller holds `_marks_lock`)."""
        if marks == self._marks:
            return
        self._replace(self.directory / freshness.NAME, freshness.encode(self.keyring, marks))
        self._marks = marks

    def mark_rekeyed(self) -> None:
        """`rekey` sealed every file: clear files are refused from now on (under the
        default `clear_sessions`)."""
        with self._marks_lock:
            self._write_marks(Marks(self._read_marks().generations, rekeyed=True))

    def _read(self, name: str) -> bytes:
        """A regular file's bytes; a link, a FIFO or a device is an error (ELOOP or
        "not a regular file"), never followed or waited on."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=self._dir)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            chunks = []
            size = 0
            while chunk := os.read(fd, 65536):
                size += len(chunk)
                if size > MAX_FILE_SIZE:
                    raise OSError(errno.EFBIG, f"larger than {MAX_FILE_SIZE} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _set_aside(self, path: Path) -> Path | None:
        target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        try:
            os.replace(path.name, target.name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError:
            return None
        return target

    def save(self, profile: str, record: Record) -> None:
        """Replace the profile's file; with a key, one generation above the highest it
        has had, and the high-water mark raised after the file is in place (a crash
        between the two leaves a file above the mark, which is accepted)."""
        self._refuse_unopened(profile)
        plain = record.to_json(profile)
        marks = self.marks() if self.keyring.sealing else None
        if marks is not None:
            plain["generation"] = (marks.get(profile) or 0) + 1
        data = json.dumps(plain, indent=1).encode() + b"\n"
        self._replace(self.path(profile), self.keyring.seal(profile, data))
        self.stale.discard(profile)
        if marks is not None:
            self._raise_mark(profile, plain["generation"])

    def reseal(self, profile: str) -> bool:
        """Seal the profile's file again with the current key if it is in clear or
        under a previous one (the bytes inside unchanged); whether it was rewritten.

        Atomic like every write: a crash leaves the old file or the new one, each of
        which opens with the keys of the moment. Raises SealedState like `load`.
        """
        path = self.path(profile)
        try:
            raw = self._read(path.name)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot read {path}: {exc.strerror}") from None
        try:
            opened = self.keyring.open(profile, raw)
        except SealError as exc:
            raise SealedState(f"{path}: {exc}", sealed_key_id(raw)) from None
        if not opened.stale:
            return False
        data, generation = opened.data, None
        marks = self.marks()
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            plain = json.loads(data)
            generation = freshness.sealed_generation(plain)
            if isinstance(plain, dict) and generation is None:
                # Sealed for the first time (or before files had generations): from now
                # on a copy without one is older than this.
                generation = plain["generation"] = (marks.get(profile) or 0) + 1
                data = json.dumps(plain, indent=1).encode() + b"\n"
        self._replace(path, self.keyring.seal(profile, data))
        self.stale.discard(profile)
        if generation is not None:
            self._raise_mark(profile, generation)
        return True

    def profiles(self) -> list[str]:
        """Every profile with a session file here, configured or not."""
        try:
            names = os.listdir(self._dir)
        except OSError as exc:
            raise StoreError(f"{self.directory}: {exc.strerror}") from None
        return sorted(n.removesuffix(SUFFIX) for n in names if _is_session_file(n))

    def _refuse_unopened(self, profile: str) -> None:
        if (reason := self.unopened.get(profile)) is not None:
            raise StoreError(f"not overwritten, {reason}")

    def delete(self, profile: str) -> None:
        self._refuse_unopened(profile)
        path = self.path(profile)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.name, dir_fd=self._dir)
            os.fsync(self._dir)
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {exc.strerror}") from None

    def _replace(self, path: Path, data: bytes) -> None:
        directory = self._dir
        tmp = f"{_TMP_PREFIX}{path.name}.{os.getpid()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            try:
                fd = os.open(tmp, flags, 0o600, dir_fd=directory)
            except FileExistsError:  # left by a write this process abandoned
                os.unlink(tmp, dir_fd=directory)
                fd = os.open(tmp, flags, 0o600, dir_fd=directory)
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
            os.replace(tmp, path.name, src_dir_fd=directory, dst_dir_fd=directory)
            os.fsync(directory)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=directory)
            raise StoreError(f"cannot write {path}: {exc.strerror}") from None
