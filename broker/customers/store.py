"""Customer sessions in SQLite: one file, WAL, group commits from one writer thread.

Why SQLite and group commits: one file and one fsync per rotation does not scale to
100,000 sessions. Every write (a new or rotated record, a deletion, a last-use time)
is queued; one writer task takes everything queued, writes it in one transaction in a
worker thread and commits it with one fsync (WAL, synchronous=FULL). Callers of
`commit` and `delete` wait for their group's fsync, so a rotated refresh token is on
disk before anyone is served the bearer that came with it; `touch` does not wait.

A group starts at once when anything with a waiter is queued (a new or rotated
record, a deletion): a rotated refresh token is never held back, because Geins has
already spent the old one and a crash before the commit would lose the session.
Rotations share an fsync by arriving together instead: the refresher starts every
proactive refresh due within one tick at once (refresher.py), and whatever is queued
while a group is written goes in the next group. Last-use times alone (`touch`, no
secret in them) wait up to `TOUCH_WINDOW` for company, so a stream of uses costs one
fsync per window, not one per `TOUCH_EVERY` per session.

Reads are lazy, by session id, one row at a time (nothing is loaded at start, so a
restart serves at once and refreshes nothing). They use their own connection, which
WAL lets read while the writer writes.

Rows: the session id (the handle's keyed hash: handles.py), the app, the customer id
(a keyed hash of the username), the username sealed with the keyring (admin
listings), the tier, created / last-used / absolute-end times (for purges and
eviction, which must work without handles), and the record, sealed twice
(record.py). The store key is in `meta`, sealed with the keyring.

The file is created 0600 (SQLite gives its -wal and -shm files the same mode) and
never opened through a link.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
import trio.lowlevel

from broker.core.errors import StoreError
from broker.core.sealing import Keyring, SealError
from broker.customers.contract import Current, Row, StoreStats
from broker.customers.model.handles import STORE_KEY_SIZE, StoreKey
from broker.storage.statedir import open_private_dir

__all__ = ["FILENAME", "CustomerStore", "Row", "StoreStats"]

Offload = Callable[..., Awaitable[Any]]
FILENAME: Final = "customers.sqlite"
#: Rows written in one transaction at most; more wait for the next group.
MAX_GROUP: Final = 4096
#: How long last-use times alone wait for other writes to share their fsync.
TOUCH_WINDOW: Final = 0.2
_STORE_KEY_LABEL: Final = "customer-store-key"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id BLOB NOT NULL UNIQUE,
    app TEXT NOT NULL,
    customer BLOB NOT NULL,
    name BLOB NOT NULL,
    remember INTEGER NOT NULL,
    created_at REAL NOT NULL,
    last_used_at REAL NOT NULL,
    ends_at REAL,
    record BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_customer ON sessions (app, customer, last_used_at);
CREATE INDEX IF NOT EXISTS sessions_use ON sessions (app, last_used_at);
"""
_UPSERT: Final = """
INSERT INTO sessions (id, app, customer, name, remember, created_at, last_used_at, ends_at, record)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    last_used_at = max(last_used_at, excluded.last_used_at),
    ends_at = excluded.ends_at,
    record = excluded.record
"""
_COLUMNS: Final = "id, app, customer, name, remember, created_at, last_used_at, ends_at, record"


def _row(values: Sequence[Any]) -> Row:
    sid, app, customer, name, remember, created, used, ends, record = values
    return Row(sid, app, customer, name, bool(remember), created, used, ends, record)


@dataclass(frozen=True, slots=True)
class _Put:
    row: Row


@dataclass(frozen=True, slots=True)
class _Delete:
    session_id: bytes


@dataclass(frozen=True, slots=True)
class _Touch:
    session_id: bytes
    at: float


@dataclass(frozen=True, slots=True)
class _Mark:
    """Writes nothing: its waiter wakes once everything queued before it is on disk."""


_Write = _Put | _Delete | _Touch | _Mark


class _Waiter:
    """Waits for `pending` writes, in one group or more; counts the rows they changed."""

    __slots__ = ("changed", "done", "error", "pending")

    def __init__(self, pending: int = 1) -> None:
        self.done = trio.Event()
        self.error: StoreError | None = None
        self.pending = pending
        self.changed = 0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _create_private(path: Path, dir_fd: int | None = None) -> None:
    """The database file, created 0600 if absent; never a link, never another uid's.
    With `dir_fd`, `path`'s name is opened relative to that directory."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path if dir_fd is None else path.name, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise StoreError(f"{path}: not a regular file of the daemon's own")
        if stat.S_IMODE(info.st_mode) & 0o077:
            raise StoreError(f"{path}: readable by others; the session store must be 0600")
    finally:
        os.close(fd)


class CustomerStore:
    def __init__(
        self,
        path: Path,
        keyring: Keyring,
        *,
        offload: Offload | None = None,
        dir_fd: int | None = None,
    ) -> None:
        """Open (or create) the store; blocking, call before serving (a few ms). With
        `dir_fd` (the directory holding `path`), the file is created relative to it."""
        self.path = path
        self._keyring = keyring
        self._offload: Offload = offload or trio.to_thread.run_sync
        _create_private(path, dir_fd)
        try:
            self._writer = _connect(path)
            self._writer.executescript(_SCHEMA)
            self._reader = _connect(path)
        except sqlite3.Error as exc:
            raise StoreError(f"{path}: {exc}") from None
        self._read_lock = threading.Lock()
        self.store_key = self._store_key()
        self._pending: list[tuple[_Write, _Waiter | None]] = []
        self._wake = trio.Event()
        #: Set when a queued write has a waiter: its group starts without a window.
        self._hurry = trio.Event()
        self.touch_window = TOUCH_WINDOW
        self.stats = StoreStats()

    @classmethod
    def in_state_dir(
        cls, state_dir: Path, keyring: Keyring, *, offload: Offload | None = None
    ) -> CustomerStore:
        """`customers.sqlite` in the daemon's state directory, reached by statedir.py's
        walk (no link, no directory another uid could swap on the way) and created
        relative to the directory's fd. SQLite then opens it and its -wal and -shm by
        that path, whose every component the walk proved is root's or the daemon's and
        writable by nobody else: no one can redirect it afterwards either."""
        fd = open_private_dir(state_dir)
        try:
            return cls(state_dir / FILENAME, keyring, offload=offload, dir_fd=fd)
        finally:
            os.close(fd)

    def _store_key(self) -> StoreKey:
        found = self._writer.execute("SELECT value FROM meta WHERE name = 'store_key'").fetchone()
        if found is None:
            key = StoreKey.generate()
            self._save_store_key(key)
            return key
        try:
            opened = self._keyring.open(_STORE_KEY_LABEL, bytes(found[0]))
        except SealError as exc:
            raise StoreError(f"{self.path}: the store key does not open ({exc})") from None
        if len(opened.data) != STORE_KEY_SIZE:
            raise StoreError(f"{self.path}: the store key is damaged")
        key = StoreKey(opened.data)
        if opened.stale:  # sealed with a previous daemon key, or in clear: seal it anew
            self._save_store_key(key)
        return key

    def _save_store_key(self, key: StoreKey) -> None:
        sealed = self._keyring.seal(_STORE_KEY_LABEL, key.material)
        self._writer.execute(
            "INSERT INTO meta (name, value) VALUES ('store_key', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (sealed,),
        )

    def close(self) -> None:
        self._writer.close()
        self._reader.close()

    # -- writes: queued, grouped, one fsync per group ----------------------------------------

    async def commit(self, row: Row, *, expected: int | None = None) -> None:
        """Write `row` (insert, or replace the record of the session with its id); return
        once it is on disk. Raises StoreError if its group failed to commit. `expected`
        is ignored: the daemon is the file's only writer (its state directory's lock)."""
        await self._wait(_Put(row))

    @contextlib.asynccontextmanager
    async def rotating(self, app: str, session_id: bytes) -> AsyncIterator[Current]:
        """The only writer needs no lease and has nothing newer to read."""
        yield Current(None, read=False)

    def watch(self, dropped: Callable[[str, bytes], None]) -> None:
        """Nobody else ends sessions in this file: nothing to watch."""

    def size(self) -> int:
        """The database's and its WAL's sizes (a stat each: cheap enough per scrape)."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{os.fspath(self.path)}{suffix}").st_size
        return total

    async def delete_many(self, app: str, session_ids: list[bytes]) -> int:
        """Delete them all, in as few groups as fit; once all are on disk, return how
        many there were (a session two callers ended at once is counted once)."""
        waiter = _Waiter(len(session_ids))
        for session_id in session_ids:
            self._queue(_Delete(session_id), waiter)
        self._hurry.set()
        self._wake.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.changed

    async def flush(self) -> None:
        """Return once every write queued before this call is on disk (or failed)."""
        waiter = _Waiter()
        self._queue(_Mark(), waiter)
        self._hurry.set()
        self._wake.set()
        await waiter.done.wait()

    def touch(self, app: str, session_id: bytes, at: float) -> None:
        """Note a last use, with the next group (never moves the time back; alone, it
        waits up to `touch_window` for company)."""
        self._queue(_Touch(session_id, at), None)
        self._wake.set()

    def _queue(self, write: _Write, waiter: _Waiter | None) -> None:
        self._pending.append((write, waiter))
        if len(self._pending) >= MAX_GROUP:
            self._hurry.set()

    async def _wait(self, write: _Write) -> None:
        waiter = _Waiter()
        self._queue(write, waiter)
        self._hurry.set()
        self._wake.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The one writer: until cancelled, write whatever is queued, a group at a time."""
        task_status.started()
        while True:
            await self._wake.wait()
            if not self._hurry.is_set():
                with trio.move_on_after(self.touch_window):
                    await self._hurry.wait()
            # Let the tasks already runnable go first: commits of refreshes whose
            # answers came in the same wake-up join this group (no timer, no delay).
            await trio.lowlevel.checkpoint()
            self._wake = trio.Event()
            self._hurry = trio.Event()
            # One group per pass: what is queued while it is written goes in the next
            # one, at once if anything in it has a waiter (`_hurry`), after a window if
            # it is only last uses. What is left of a queue longer than a group is a
            # backlog: it goes next, at once.
            group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            if self._pending:
                self._wake.set()
                self._hurry.set()
            if not group:
                continue
            error, changed = None, [0] * len(group)
            try:
                changed = await self._offload(self._write_group, [w for w, _ in group])
            except StoreError as exc:
                error = exc
            for (_, waiter), rows in zip(group, changed, strict=True):
                if waiter is not None:
                    waiter.error = waiter.error or error
                    waiter.changed += rows
                    waiter.pending -= 1
                    if waiter.pending == 0:
                        waiter.done.set()

    def _write_group(self, writes: list[_Write]) -> list[int]:
        """Write `writes` in one transaction; the rows each changed."""
        started = time.monotonic()
        conn = self._writer
        changed = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in writes:
                if isinstance(write, _Put):
                    cursor = conn.execute(_UPSERT, write.row.values())
                elif isinstance(write, _Delete):
                    cursor = conn.execute("DELETE FROM sessions WHERE id = ?", (write.session_id,))
                elif isinstance(write, _Touch):
                    cursor = conn.execute(
                        "UPDATE sessions SET last_used_at = max(last_used_at, ?) WHERE id = ?",
                        (write.at, write.session_id),
                    )
                else:
                    changed.append(0)
                    continue
                changed.append(cursor.rowcount)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self.stats.failures += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"the session store refused a write ({exc})") from None
        self.stats.commits += 1
        self.stats.rows += len(writes)
        self.stats.commit_seconds += time.monotonic() - started
        return changed

    # -- reads: lazy, by id or by index --------------------------------------------------------

    async def _read(self, sql: str, *args: Any) -> list[Any]:
        return list(await self._offload(self._query, sql, args))

    def _query(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"the session store refused a read ({exc})") from None

    async def get(self, app: str, session_id: bytes) -> Row | None:
        sql = f"SELECT {_COLUMNS} FROM sessions WHERE id = ?"  # noqa: S608 - constant; values bound
        found = await self._read(sql, session_id)
        row = _row(found[0]) if found else None
        return row if row is not None and row.app == app else None

    async def count(self, app: str) -> int:
        found = await self._read("SELECT count(*) FROM sessions WHERE app = ?", app)
        return int(found[0][0])

    async def customer_sessions(self, app: str, customer_id: bytes) -> list[Row]:
        """A customer's sessions, least recently used first."""
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM sessions WHERE app = ? AND customer = ? "  # noqa: S608
            "ORDER BY last_used_at",
            app,
            customer_id,
        )
        return [_row(r) for r in rows]

    async def customer_uses(self, app: str, customer_id: bytes) -> list[tuple[bytes, float]]:
        """The ids and stored last uses of a customer's sessions (no records: what the
        per-customer limit needs at every login)."""
        rows = await self._read(
            "SELECT id, last_used_at FROM sessions WHERE app = ? AND customer = ?",
            app,
            customer_id,
        )
        return [(bytes(r[0]), float(r[1])) for r in rows]

    async def least_recent(self, app: str, limit: int) -> list[tuple[bytes, float]]:
        """The ids and stored last uses of an app's least recently used sessions."""
        rows = await self._read(
            "SELECT id, last_used_at FROM sessions WHERE app = ? ORDER BY last_used_at LIMIT ?",
            app,
            limit,
        )
        return [(bytes(r[0]), float(r[1])) for r in rows]

    async def listing(self, app: str, limit: int) -> list[Row]:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM sessions WHERE app = ? "  # noqa: S608
            "ORDER BY last_used_at DESC LIMIT ?",
            app,
            limit,
        )
        return [_row(r) for r in rows]

    async def ended(
        self, app: str, now: float, idle_short: float, idle_remembered: float, limit: int
    ) -> list[Row]:
        """Sessions past their absolute end or idle by the stored last use."""
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM sessions WHERE app = ? AND ("  # noqa: S608
            "ends_at <= ? OR last_used_at <= ? OR (remember = 0 AND last_used_at <= ?)) LIMIT ?",
            app,
            now,
            now - idle_remembered,
            now - idle_short,
            limit,
        )
        return [_row(r) for r in rows]
