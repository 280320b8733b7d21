"""The narrow seam between a `Profile` and fleet mode.

A profile consults its link around every change of its session: `rotation()` before a
refresh (in fleet mode: take the lease, re-read the shared record, maybe adopt a newer
session instead), `commit()` after it, `rejected()` when Geins refuses the refresh
token, `replaced()` after a login, register, password change or logout. An unshared
profile has `LOCAL`, which says yes to everything and costs nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Protocol

from broker.storage.store import Record


class Link(Protocol):
    shared: bool

    def rotation(self) -> AbstractAsyncContextManager[bool]:
        """Held around a refresh. Yields False when this node must not refresh now
        (another node's newer session was adopted instead). Raises `FleetUnavailable`
        when the store cannot be reached: a shared session is never refreshed without
        the lease."""
        ...

    async def commit(self, record: Record | None) -> bool:
        """The refresh is done and saved locally: share it. False if a newer session
        was adopted instead (the lease had lapsed and another node committed)."""
        ...

    async def rejected(self) -> bool:
        """Geins rejected the refresh token: True if a newer session was adopted."""
        ...

    async def replaced(self, record: Record | None) -> None:
        """A login, register, password change (a record) or logout (None): fleet-wide."""
        ...

    def status(self) -> dict[str, Any] | None: ...


class LocalLink:
    """An unshared profile: this host's alone, as before fleet mode."""

    shared = False

    @asynccontextmanager
    async def rotation(self) -> AsyncIterator[bool]:
        yield True

    async def commit(self, record: Record | None) -> bool:
        return True

    async def rejected(self) -> bool:
        return False

    async def replaced(self, record: Record | None) -> None:
        return None

    def status(self) -> dict[str, Any] | None:
        return None


LOCAL: Final = LocalLink()
