"""One shared profile's side of the fleet protocol: the `Link` its `Profile` consults.

Takes and keeps the lease around a rotation, re-reads and settles, commits with a
compare-and-set, adopts what other nodes commit (synchronously, through
`Profile.adopt`), and writes back what the store lost. `coordinator.Fleet` owns the
connection and the tasks; this holds one profile's generation and decisions.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import trio

from broker.core.errors import FleetUnavailable
from broker.core.sealing import SealError, is_sealed
from broker.fleet.redis_store import Stored, StoreFailure
from broker.observe.log import events
from broker.policy import rotation
from broker.storage.store import Record

if TYPE_CHECKING:
    from broker.fleet.coordinator import Fleet
    from broker.sessions.profile import Profile

log = events("broker.fleet")

#: A node holding only a session read from its own disk waits this many polls for a
#: node that learned a generation from the store to republish first.
_DISK_REPUBLISH_POLLS: Final = 2


def reason(exc: BaseException) -> str:
    """What to log or show about a failure: its message, bounded."""
    text = str(exc) or type(exc).__name__
    return text[:200]


class SharedLink:
    """One shared profile's side of the protocol (see `link.Link` for the contract)."""

    shared = True

    def __init__(self, fleet: Fleet, profile: Profile) -> None:
        self.fleet = fleet
        self.profile = profile
        self.name = profile.name
        #: The generation of the session this node serves; 0: none from the store yet.
        self.generation = 0
        #: What this node serves, sealed: republished if the store loses it.
        self.blob: bytes | None = None
        self.committed_by: str | None = None
        self.lease_node: str | None = None
        self._seen = 0
        self._changed = trio.Event()
        self._fetching = trio.Lock()
        self._empty_polls = 0
        #: A session rotated (or logged in) here whose commit the store missed: it is
        #: the live one, so it is written back over whatever the store has meanwhile.
        self._unpublished = False
        #: trio time before which this node does not rotate: the store was found behind
        #: or just came back, and other nodes may still be writing back newer sessions.
        self._settle_until = 0.0

    def __repr__(self) -> str:
        return f"SharedLink({self.name!r}, generation={self.generation})"

    def seal(self, record: Record | None) -> bytes:
        plain = json.dumps(None if record is None else record.to_json(self.name)).encode()
        keyring = self.fleet.keys()
        if not keyring.sealing:  # the daemon refuses to start so; a reload must not either
            raise FleetUnavailable("no sealing key: a shared session is never stored in clear")
        return keyring.seal(self.name, plain)

    def open(self, blob: bytes) -> Record | None:
        """The session in a record, which must be sealed (one in clear is refused)."""
        if not is_sealed(blob):
            raise SealError("the record in the store is not sealed; refusing it")
        data = json.loads(self.fleet.keys().open(self.name, blob).data)
        return None if data is None else Record.from_json(data, self.name)

    # -- the Link seam -------------------------------------------------------------------

    @asynccontextmanager
    async def rotation(self) -> AsyncIterator[bool]:
        store, config = self.fleet.store, self.fleet.config
        lease = f"{config.node} {secrets.token_hex(8)}"
        if not await self._acquire(lease):
            yield False
            return
        keeper = trio.CancelScope()
        try:
            self.fleet.spawn(self._keep, lease, keeper)
            stored = await self._read_under_lease()
            decision = rotation.after_lease(self.generation, stored.generation)
            if decision is rotation.AfterLease.SETTLE or trio.current_time() < self._settle_until:
                log.warning(
                    "store_settling",
                    profile=self.name,
                    held=self.generation,
                    store=stored.generation,
                )
                if decision is rotation.AfterLease.SETTLE:
                    self.settle()
                    await self.republish()
                await trio.sleep_until(self._settle_until)
                stored = await self._read_under_lease()
                decision = rotation.after_lease(self.generation, stored.generation)
            if decision is rotation.AfterLease.ADOPT:
                self._adopt(stored)
                yield False
                return
            if decision is rotation.AfterLease.SETTLE:
                raise FleetUnavailable(
                    f"the fleet store {config.display_url} does not keep what is written to it"
                )
            self._seen = stored.generation
            yield True
        finally:
            keeper.cancel()
            # Unreleased, it expires within lease_ttl.
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(config.command_timeout),
                contextlib.suppress(*StoreFailure),
            ):
                await store.release(self.name, lease)

    async def _read_under_lease(self) -> Stored:
        try:
            return await self.fleet.store.read(self.name)
        except StoreFailure as exc:
            raise self.fleet.unavailable(exc) from None

    async def _acquire(self, lease: str) -> bool:
        """Take the lease, waiting for another holder; False if its commit (or any
        newer generation) arrived meanwhile and was adopted."""
        config = self.fleet.config
        start = self.generation
        deadline = trio.current_time() + 2 * config.lease_ttl
        while True:
            try:
                got = await self.fleet.store.acquire(self.name, lease, config.lease_ttl)
            except StoreFailure as exc:
                raise self.fleet.unavailable(exc) from None
            if got == 1:
                return True
            if self.generation != start:
                return False
            if trio.current_time() >= deadline:
                raise FleetUnavailable(
                    f"another node has held the lease of {self.name!r} for over "
                    f"{2 * config.lease_ttl:g} s"
                )
            changed = self._changed
            with trio.move_on_after(rotation.lease_wait(-got, config.lease_ttl)):
                await changed.wait()
            if self.generation != start:
                return False

    async def _keep(self, lease: str, scope: trio.CancelScope) -> None:
        config = self.fleet.config
        with scope:
            while True:
                await trio.sleep(rotation.extend_every(config.lease_ttl))
                try:
                    if not await self.fleet.store.extend(self.name, lease, config.lease_ttl):
                        log.warning("lease_lost", profile=self.name)
                        return
                except StoreFailure as exc:
                    self.fleet.failed(exc)

    async def commit(self, record: Record | None) -> bool:
        blob = self.seal(record)
        expected, new = rotation.commit_generations(self.generation, self._seen)
        try:
            written, generation = await self.fleet.store.write(
                self.name,
                "cas",
                new=new,
                expected=expected,
                committed_at=self.fleet.wall.now(),
                blob=blob,
            )
        except StoreFailure as exc:
            # We hold the only copy of the live refresh token: keep serving it, and
            # write it back as soon as the store answers (the poll sees held > stored).
            self.fleet.failed(exc)
            self._hold(new, blob, self.fleet.config.node)
            self._unpublished = True
            log.warning("commit_deferred", profile=self.name, generation=new)
            return True
        if written:
            self._hold(generation, blob, self.fleet.config.node)
            self._unpublished = False
            log.info("committed", profile=self.name, generation=generation)
            return True
        log.error(
            "commit_conflict",
            profile=self.name,
            ours=new,
            store=generation,
            why="the lease lapsed and another node committed first; adopting its session",
        )
        await self.fetch(generation)
        return False

    async def rejected(self) -> bool:
        # Once at once, and once more after the nodes had time to write back a session
        # the store missed: a rejection is final only if nobody holds anything newer.
        for wait in (0.0, rotation.SETTLE_POLLS * self.fleet.config.poll_interval):
            await trio.sleep(wait)
            try:
                stored = await self.fleet.store.read(self.name)
            except StoreFailure as exc:
                self.fleet.failed(exc)
                return False
            if rotation.after_rejection(self.generation, stored.generation):
                log.info("stale_refresh_token", profile=self.name, adopting=stored.generation)
                self._adopt(stored)
                return True
        return False

    async def replaced(self, record: Record | None) -> None:
        blob = self.seal(record)
        new = max(self.generation, self._seen) + 1
        try:
            _, generation = await self.fleet.store.write(
                self.name,
                "force",
                new=new,
                expected=0,
                committed_at=self.fleet.wall.now(),
                blob=blob,
            )
        except StoreFailure as exc:
            self.fleet.failed(exc)
            self._hold(new, blob, self.fleet.config.node)
            self._unpublished = True
            log.warning("commit_deferred", profile=self.name, generation=new)
            return
        self._hold(generation, blob, self.fleet.config.node)
        self._unpublished = False
        log.info("committed", profile=self.name, generation=generation)

    def status(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "lease_holder": self.lease_node,
            "committed_by": self.committed_by,
            **self.fleet.health(),
        }

    # -- learning of other nodes' commits ------------------------------------------------

    def settle(self) -> None:
        """Hold off rotating for a few polls (see `rotation.SETTLE_POLLS`)."""
        wait = rotation.SETTLE_POLLS * self.fleet.config.poll_interval
        self._settle_until = max(self._settle_until, trio.current_time() + wait)

    def _hold(self, generation: int, blob: bytes, node: str) -> None:
        self.generation, self.blob, self.committed_by = generation, blob, node
        self._seen = max(self._seen, generation)
        self._empty_polls = 0
        self._changed.set()
        self._changed = trio.Event()

    def announced(self, stored: Stored) -> None:
        """A commit as published: adopted on the spot, with no read of the record."""
        if rotation.should_fetch(self.generation, stored.generation):
            self._adopt(stored)

    def polled(self, generation: int, lease_node: str | None) -> None:
        self.lease_node = lease_node
        if self._unpublished:
            self.settle()
            self.fleet.spawn(self.republish, True)
        elif rotation.should_fetch(self.generation, generation):
            self.fleet.spawn(self.fetch, generation)
        elif rotation.should_republish(self.generation, generation) and self.blob is not None:
            self.settle()
            self.fleet.spawn(self.republish)
        elif generation == 0 and self.blob is not None:
            # Only our own disk's session: let nodes that hold store generations go first.
            self._empty_polls += 1
            self.settle()
            if self._empty_polls > _DISK_REPUBLISH_POLLS:
                self.fleet.spawn(self.republish)

    async def fetch(self, announced: int) -> None:
        async with self._fetching:
            if not rotation.should_fetch(self.generation, announced):
                return
            try:
                stored = await self.fleet.store.read(self.name)
            except StoreFailure as exc:
                self.fleet.failed(exc)
                return
            if rotation.should_fetch(self.generation, stored.generation):
                self._adopt(stored)

    async def republish(self, over: bool = False) -> None:
        """Write back what we hold if the store has less; `over`: whatever it has (a
        session rotated here whose commit the store missed is the live one)."""
        blob = self.blob
        if blob is None:
            return
        generation = max(self.generation, 1)
        try:
            written, now = await self.fleet.store.write(
                self.name,
                "force" if over else "higher",
                new=generation,
                expected=0,
                committed_at=self.fleet.wall.now(),
                blob=blob,
            )
        except StoreFailure as exc:
            self.fleet.failed(exc)
            return
        if written:
            log.info("republished", profile=self.name, generation=now)
            self._hold(now, blob, self.committed_by or self.fleet.config.node)
            self._unpublished = False
        else:
            await self.fetch(now)

    def _adopt(self, stored: Stored) -> None:
        """Serve the session `stored` holds, its times moved onto our clock."""
        if stored.generation == 0:
            return
        try:
            record = self.open(stored.blob)
        except (SealError, ValueError) as exc:
            log.error("fleet_record_unreadable", profile=self.name, reason=reason(exc))
            return
        if record is not None:
            shift = rotation.Rebase.between(
                stored.committed_at,
                stored.store_committed_ms,
                stored.store_now_ms,
                self.fleet.wall.now(),
            )
            record = replace(
                record,
                obtained_at=shift(record.obtained_at),
                expires_at=shift(record.expires_at),
                session_expires_at=shift(record.session_expires_at),
                last_refresh_at=shift(record.last_refresh_at),
            )
        self._hold(stored.generation, stored.blob, stored.node)
        self.profile.adopt(record)
        log.info("adopted", profile=self.name, generation=stored.generation, node=stored.node)

    def retry_soon(self, now: float) -> None:
        """The store is back: a profile backing off because of it retries now."""
        session = self.profile.session
        if session.failures and session.can_refresh and not session.login_required:
            session.refresh_due(now)
            self.profile.plan()
