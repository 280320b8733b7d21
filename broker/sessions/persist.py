"""Durable writes of one profile's session, with retry.

A write that fails (a full disk, a read-only mount) does not stop the daemon: it keeps
serving from memory, the session is marked degraded (`Session.write_failed`), and the
write is pending until a retry, on a capped exponential backoff, succeeds. Writes run
off the event loop (`offload`: a write and its fsyncs block).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from broker.core.errors import StoreError
from broker.geins import claims
from broker.observe.log import events
from broker.policy.session import Saved, Session, Tokens
from broker.storage.store import Record, Store

log = events("broker.profile")

#: Retry delays for a failed write to disk.
_WRITE_RETRY_FIRST, _WRITE_RETRY_CAP = 1.0, 60.0

#: Runs a blocking call (a write and its fsyncs) off the event loop.
Offload = Callable[..., Awaitable[Any]]


def saved_of(name: str, record: Record) -> Saved:
    """The session a saved record holds. A bearer that does not decode is dropped (the
    refresh token may still bring a new one); the rest is kept."""
    tokens = None
    if (
        record.bearer is not None
        and record.obtained_at is not None
        and record.expires_at is not None
    ):
        try:
            decoded = claims.decode(record.bearer.reveal())
        except claims.NotAJwt as exc:
            log.warning("restore_bearer_unreadable", profile=name, reason=str(exc))
        else:
            tokens = Tokens(
                bearer=record.bearer,
                refresh=record.refresh,
                claims=decoded,
                obtained_at=record.obtained_at,
                expires_at=record.expires_at,
                session_expires_at=record.session_expires_at,
            )
    return Saved(
        tokens=tokens,
        username=record.username,
        remember=record.remember,
        login_required=record.login_required,
        last_refresh_at=record.last_refresh_at,
        refreshes=record.refreshes,
    )


def record_of(
    session: Session,
    new: Tokens | None = None,
    *,
    username: str | None = None,
    remember: bool | None = None,
    refreshed_at: float | None = None,
) -> Record | None:
    """What to save: the session as it is, or as it becomes with `new` tokens.

    None means nothing to keep (logged out): the file is deleted.
    """
    tokens = new or session.tokens
    if tokens is None and not session.login_required:
        return None
    return Record(
        username=username or session.username,
        remember=session.remember if remember is None else remember,
        refresh=tokens.refresh if tokens else None,
        bearer=tokens.bearer if tokens else None,
        obtained_at=tokens.obtained_at if tokens else None,
        expires_at=tokens.expires_at if tokens else None,
        session_expires_at=tokens.session_expires_at if tokens else None,
        login_required=session.login_required if new is None else False,
        last_refresh_at=refreshed_at or session.last_refresh_at,
        refreshes=session.refreshes + (refreshed_at is not None),
    )


class PendingWrite:
    """One profile's writes to its state file, and the one that failed, if any.

    Callers hold the profile's upstream lock, so there is one write at a time per
    profile. `on_change` is told when the session's health changes (degraded or
    recovered); `on_retry` when a retry is newly due (the profile plans a step).
    """

    def __init__(
        self,
        name: str,
        session: Session,
        store: Store,
        offload: Offload,
        *,
        on_change: Callable[[], None],
        on_retry: Callable[[], None],
    ) -> None:
        self._name = name
        self._session = session
        self._store = store
        self._offload = offload
        self._on_change = on_change
        self._on_retry = on_retry
        self._failures = 0
        #: A write is owed (it failed, or an adopted session is not on disk yet)...
        self.pending = False
        #: ...and is retried at this trio time.
        self.retry_at = 0.0

    def owe(self) -> None:
        """The session in memory is not on disk: write it at the next step."""
        self.pending, self.retry_at = True, trio.current_time()

    def due(self) -> bool:
        return self.pending and trio.current_time() >= self.retry_at

    def retry_in(self) -> float:
        """Seconds until the pending write is retried (inf when none is pending)."""
        if not self.pending:
            return float("inf")
        return max(self.retry_at - trio.current_time(), 0.0)

    async def flush(self) -> None:
        """One more try at a write that failed. The caller holds the upstream lock."""
        if self.pending:
            await self.save(record_of(self._session))

    async def save(self, record: Record | None) -> bool:
        """Write (None: delete) in a worker thread. A failure keeps the daemon serving
        from memory, marks the session degraded, and schedules another try."""
        session = self._session
        try:
            if record is None:
                await self._offload(self._store.delete, self._name)
            else:
                await self._offload(self._store.save, self._name, record)
        except StoreError as exc:
            self._failures += 1
            delay = min(_WRITE_RETRY_CAP, _WRITE_RETRY_FIRST * 2 ** (self._failures - 1))
            self.pending = True
            self.retry_at = trio.current_time() + delay
            session.write_failed(str(exc))
            log.error("state_write_failed", profile=self._name, reason=str(exc), retry_in=delay)
            self._on_change()
            self._on_retry()
            return False
        if session.store_error is not None:
            log.info("state_write_recovered", profile=self._name)
            session.written()
            self._on_change()
        self.pending = False
        self._failures = 0
        return True
