"""What the manager and the refresher need of a session store, and what one returns.

Two stores meet this: `store.py`'s SQLite `CustomerStore` (one daemon, the default) and
`broker/fleet/customer_store.py`'s Redis one (fleet mode, several daemons sharing the
sessions). The manager and the refresher see only `SessionStore`, so fleet mode adds a
store, not a second manager; `daemon` picks which.

What differs between the two is said by the results, never by a mode flag:
- `rotating` is the seam for one refresh at a time fleet-wide: the Redis store holds the
  session's lease for the block and yields the record as it is now (the refresher adopts
  a newer generation instead of refreshing); SQLite, the only writer of its file,
  yields `Current(None)` without reading.
- `commit(row, expected=...)` is a compare-and-set on the plain generation where the
  store has one: a mismatch raises `CommitConflict` (another node committed, or the
  session was ended). SQLite has no other writer and writes.
- `Row.generation` is the store's plain generation (None where there is none): it is
  only ever compared with the sealed one (record.py), never believed by itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from broker.core.errors import StoreError
from broker.customers.model.handles import StoreKey


@dataclass(frozen=True, slots=True)
class Row:
    session_id: bytes
    app: str
    customer_id: bytes
    name: bytes = field(repr=False)
    remember: bool
    created_at: float
    last_used_at: float
    #: The absolute end (Geins' maxAge); None if Geins did not state one.
    ends_at: float | None
    record: bytes = field(repr=False)
    #: The generation the store files the record under, outside the seals (None: the
    #: store keeps none). Written from the sealed one; read back only to compare.
    generation: int | None = None

    def values(self) -> tuple[Any, ...]:
        return (
            self.session_id,
            self.app,
            self.customer_id,
            self.name,
            int(self.remember),
            self.created_at,
            self.last_used_at,
            self.ends_at,
            self.record,
        )


@dataclass(slots=True)
class StoreStats:
    """What the store has done: commits (fsyncs, or Redis writes), rows they wrote,
    time they took."""

    commits: int = 0
    rows: int = 0
    commit_seconds: float = 0.0
    failures: int = 0


@dataclass(frozen=True, slots=True)
class Current:
    """What `rotating` found: the session's row as stored now, read under its lease
    (`read` False: the store has one writer and did not read; `row` is then None)."""

    row: Row | None
    read: bool = True


class CommitConflict(StoreError):
    """A compare-and-set found another generation: another node committed first, or the
    session is gone. Never carries a secret."""


class SessionStore(Protocol):
    stats: StoreStats

    @property
    def store_key(self) -> StoreKey:
        """The MAC key of session and customer ids (handles.py); StoreError until the
        store has one."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...
    def close(self) -> None: ...
    def watch(self, dropped: Callable[[str, bytes], None]) -> None: ...
    def rotating(self, app: str, session_id: bytes) -> AbstractAsyncContextManager[Current]: ...
    async def commit(self, row: Row, *, expected: int | None = None) -> None: ...
    async def delete_many(self, app: str, session_ids: list[bytes]) -> int: ...
    async def flush(self) -> None: ...
    def touch(self, app: str, session_id: bytes, at: float) -> None: ...
    async def get(self, app: str, session_id: bytes) -> Row | None: ...
    async def count(self, app: str) -> int: ...
    async def customer_sessions(self, app: str, customer_id: bytes) -> list[Row]: ...
    async def customer_uses(self, app: str, customer_id: bytes) -> list[tuple[bytes, float]]: ...
    async def least_recent(self, app: str, limit: int) -> list[tuple[bytes, float]]: ...
    async def listing(self, app: str, limit: int) -> list[Row]: ...
    async def ended(
        self, app: str, now: float, idle_short: float, idle_remembered: float, limit: int
    ) -> list[Row]: ...
    def size(self) -> int: ...
