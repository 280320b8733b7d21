"""One shared profile's side of the fleet protocol: the `Link` its `Profile` consults.

Takes and keeps the lease around a rotation, re-reads and settles, commits with a
compare-and-set, adopts what other nodes commit (synchronously, through
`Profile.adopt`), and writes back what the store lost. `coordinator.Fleet` owns the
connection and the tasks; this holds one profile's generation and decisions.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from broker.core.clock import WallClock
from broker.core.errors import FleetUnavailable
from broker.core.sealing import Keyring, SealError
from broker.fleet import envelope
from broker.fleet.redis_store import (
    Acquired,
    HeldWithoutExpiry,
    LeaseState,
    Polled,
    RedisStore,
    StoreCorrupt,
    Stored,
    StoreFailure,
    Written,
    escaped,
)
from broker.fleet.settings import ClusterConfig
from broker.observe.log import events
from broker.policy import rotation
from broker.storage.store import Record

if TYPE_CHECKING:
    from broker.sessions.profile import Profile

log = events("broker.fleet")

#: A node holding only a session read from its own disk waits this many polls for a
#: node that learned a generation from the store to republish first.
_DISK_REPUBLISH_POLLS: Final = 2


#: Attempts of a write that must land above whatever the store holds (a login, a
#: write-back of the live session): each one loses only to another node's write.
_FORCE_ATTEMPTS: Final = 5

#: A record that is refused or does not open is logged at most once per this many
#: seconds per profile (`since`: how many since the last line): anyone who reaches Redis can publish
#: thousands of them a second, and a line each would flood the log (and make journald
#: drop the lines that matter).
_REFUSAL_LOG_INTERVAL: Final = 10.0


def reason(exc: BaseException) -> str:
    """What to log or show about a failure: its message, escaped and bounded."""
    return escaped(str(exc) or type(exc).__name__, 200)


class FleetContext(Protocol):
    """What a `SharedLink` needs from the daemon's fleet (`coordinator.Fleet` is one):
    the store, the settings, the keys and clock of the moment, a nursery, and where to
    report the store's health."""

    config: ClusterConfig
    store: RedisStore
    wall: WallClock
    keys: Callable[[], Keyring]

    def spawn(self, fn: Any, *args: Any) -> None: ...

    def failed(self, exc: BaseException) -> None: ...

    def unavailable(self, exc: BaseException) -> FleetUnavailable: ...

    def health(self) -> dict[str, Any]: ...


class SharedLink:
    """One shared profile's side of the protocol (see `link.Link` for the contract).

    Over the house's ~300 lines, on purpose: the lease, the settle, the commit and the
    adoption are one protocol over one generation (docs/cluster.md's failure table),
    and each step reads what the others left; the store's I/O is `RedisStore`'s and
    the decisions are `policy.rotation`'s, so what is left here is that sequence.
    """

    shared = True

    def __init__(self, fleet: FleetContext, profile: Profile) -> None:
        self.fleet = fleet
        self.profile = profile
        self.name = profile.name
        #: The generation of the session this node serves; 0: none from the store yet.
        self.generation = 0
        #: What this node serves (None: logged out), republished if the store loses it;
        #: `holding` is False until there is something to republish.
        self.record: Record | None = None
        self.holding = False
        self.committed_by: str | None = None
        self.lease_node: str | None = None
        self.lease_state = LeaseState.FREE
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
        #: trio time of the last refusal logged, and the refusals not logged since.
        self._refusal_logged_at = -_REFUSAL_LOG_INTERVAL
        self._refusals_unlogged = 0

    def __repr__(self) -> str:
        return f"SharedLink({self.name!r}, generation={self.generation})"

    def hold_from_disk(self, record: Record) -> None:
        """What this node's disk held at start: republished only if the store turns out
        to have nothing better."""
        self.record, self.holding = record, True

    def seal(self, record: Record | None, generation: int) -> bytes:
        keyring = self.fleet.keys()
        if not keyring.sealing:  # the daemon refuses to start so; a reload must not either
            raise FleetUnavailable("no sealing key: a shared session is never stored in clear")
        return envelope.seal(keyring, self.name, generation, self.fleet.wall.now(), record)

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
                if self._adopt(stored):
                    yield False
                    return
                # Refused: ours goes back over it if ours is newer, then look again.
                if self._unpublished:
                    await self.republish(True)
                stored = await self._read_under_lease()
                if rotation.after_lease(self.generation, stored.generation) is not (
                    rotation.AfterLease.REFRESH
                ):
                    raise FleetUnavailable(
                        f"the fleet store {config.display_url} holds a record of "
                        f"{self.name!r} that is refused; not rotating"
                    )
                decision = rotation.AfterLease.REFRESH
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
            if isinstance(got, Acquired):
                return True
            if isinstance(got, HeldWithoutExpiry):
                # Never a node's (every lease is taken with an expiry): wait as for a
                # full lease, so it costs a command per lease time, not a hot loop.
                if self.lease_state is not LeaseState.HELD_WITHOUT_EXPIRY:
                    log.error("lease_without_expiry", profile=self.name, holder=escaped(got.by))
                self.lease_node, self.lease_state = got.by, LeaseState.HELD_WITHOUT_EXPIRY
                wait = rotation.lease_wait(None, config.lease_ttl)
            else:
                wait = rotation.lease_wait(got.ttl, config.lease_ttl)
            if self.generation != start:
                return False
            if trio.current_time() >= deadline:
                raise FleetUnavailable(
                    f"another node has held the lease of {self.name!r} for over "
                    f"{2 * config.lease_ttl:g} s"
                )
            changed = self._changed
            with trio.move_on_after(min(wait, max(deadline - trio.current_time(), 0.0))):
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
        expected, new = rotation.commit_generations(self.generation, self._seen)
        try:
            result = await self.fleet.store.write_if(
                self.name,
                expected=expected,
                new=new,
                committed_at=self.fleet.wall.now(),
                blob=self.seal(record, new),
            )
        except StoreFailure as exc:
            # We hold the only copy of the live refresh token: keep serving it, and
            # write it back as soon as the store answers (the poll sees held > stored).
            self._deferred(exc, new, record)
            return True
        if result.written:
            self._hold(result.generation, record, self.fleet.config.node)
            self._unpublished = False
            log.info("committed", profile=self.name, generation=result.generation)
            return True
        log.error(
            "commit_conflict",
            profile=self.name,
            ours=new,
            store=result.generation,
            why="the lease lapsed and another node committed first; adopting its session",
        )
        await self.fetch(result.generation)
        return False

    def _deferred(self, exc: BaseException, generation: int, record: Record | None) -> None:
        self.fleet.failed(exc)
        self._hold(generation, record, self.fleet.config.node)
        self._unpublished = True
        log.warning("commit_deferred", profile=self.name, generation=generation)

    async def _write_above(self, record: Record | None, new: int) -> Written:
        """Write `record` at `new` or, if the store holds that or more, just above it:
        each record is sealed with the generation it is written under."""
        for _ in range(_FORCE_ATTEMPTS):
            result = await self.fleet.store.write_if_higher(
                self.name,
                new=new,
                committed_at=self.fleet.wall.now(),
                blob=self.seal(record, new),
            )
            if result.written:
                return result
            new = result.generation + 1
        raise StoreCorrupt(f"{self.name!r}: outbid {_FORCE_ATTEMPTS} times in a row")

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
                if self._adopt(stored):
                    return True
        return False

    async def replaced(self, record: Record | None) -> None:
        new = max(self.generation, self._seen) + 1
        try:
            result = await self._write_above(record, new)
        except StoreFailure as exc:
            self._deferred(exc, new, record)
            return
        self._hold(result.generation, record, self.fleet.config.node)
        self._unpublished = False
        log.info("committed", profile=self.name, generation=result.generation)

    def status(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "lease_holder": self.lease_node,
            "lease": str(self.lease_state),
            "committed_by": self.committed_by,
            **self.fleet.health(),
        }

    # -- learning of other nodes' commits ------------------------------------------------

    def settle(self) -> None:
        """Hold off rotating for a few polls (see `rotation.SETTLE_POLLS`)."""
        wait = rotation.SETTLE_POLLS * self.fleet.config.poll_interval
        self._settle_until = max(self._settle_until, trio.current_time() + wait)

    def _hold(self, generation: int, record: Record | None, node: str) -> None:
        self.generation, self.record, self.holding = generation, record, True
        self.committed_by = node
        self._seen = max(self._seen, generation)
        self._empty_polls = 0
        self._changed.set()
        self._changed = trio.Event()

    def announced(self, stored: Stored) -> None:
        """A commit as published: adopted on the spot, with no read of the record."""
        if rotation.should_fetch(self.generation, stored.generation):
            self._adopt(stored)

    def polled(self, seen: Polled) -> None:
        if seen.lease is LeaseState.HELD_WITHOUT_EXPIRY and self.lease_state is not seen.lease:
            log.error("lease_without_expiry", profile=self.name, holder=escaped(seen.lease_node))
        self.lease_node, self.lease_state = seen.lease_node, seen.lease
        generation = seen.generation
        if self._unpublished:
            self.settle()
            self.fleet.spawn(self.republish, True)
        elif rotation.should_fetch(self.generation, generation):
            self.fleet.spawn(self.fetch, generation)
        elif rotation.should_republish(self.generation, generation) and self.holding:
            self.settle()
            self.fleet.spawn(self.republish)
        elif generation == 0 and self.holding:
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
        if not self.holding:
            return
        record, generation = self.record, max(self.generation, 1)
        try:
            if over:
                result = await self._write_above(record, generation)
            else:
                result = await self.fleet.store.write_if_higher(
                    self.name,
                    new=generation,
                    committed_at=self.fleet.wall.now(),
                    blob=self.seal(record, generation),
                )
        except StoreFailure as exc:
            self.fleet.failed(exc)
            return
        if result.written:
            log.info("republished", profile=self.name, generation=result.generation)
            self._hold(result.generation, record, self.committed_by or self.fleet.config.node)
            self._unpublished = False
        else:
            await self.fetch(result.generation)

    def _adopt(self, stored: Stored) -> bool:
        """Serve the session `stored` holds, its times moved onto our clock. False if
        it is refused: it does not open, its sealed generation is not the one it is
        published under, or it is not newer than ours. A refused record is the store's
        failure; if what we hold is newer than what the seal says, ours is written
        back over it at the next poll, as a commit the store missed is.

        Synchronous, so an adoption never waits for the profile's lock."""
        if stored.generation == 0:
            return False
        try:
            opened = envelope.open_record(
                self.fleet.keys(), self.name, stored.blob, stored.generation
            )
        except envelope.RecordRefused as exc:
            self._refused(exc)
            if exc.sealed_generation <= self.generation and self.holding:
                self._unpublished = True
            return False
        except (SealError, ValueError) as exc:
            self._log_refusal("fleet_record_unreadable", exc)
            return False
        if not rotation.should_fetch(self.generation, opened.generation):
            return False  # a newer one arrived while this one was read
        record = opened.session
        if record is not None:
            # The commit time is the sealed one; the store's own times (outside the
            # seal) can only make a record look fresher, and a bearer is never served
            # past its JWT's exp whatever its times say (`Tokens.within_exp`).
            shift = rotation.Rebase.between(
                opened.committed_at,
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
        self._hold(opened.generation, record, stored.node)
        self.profile.adopt(record)
        log.info(
            "adopted", profile=self.name, generation=opened.generation, node=escaped(stored.node)
        )
        return True

    def _refused(self, exc: envelope.RecordRefused) -> None:
        self._log_refusal("fleet_record_refused", exc)
        self.fleet.failed(StoreCorrupt(f"the record of {self.name!r} is refused: {exc}"))

    def _log_refusal(self, event: str, exc: BaseException) -> None:
        now = trio.current_time()
        if now - self._refusal_logged_at < _REFUSAL_LOG_INTERVAL:
            self._refusals_unlogged += 1
            return
        log.error(event, profile=self.name, reason=reason(exc), since=self._refusals_unlogged + 1)
        self._refusal_logged_at, self._refusals_unlogged = now, 0

    def retry_soon(self, now: float) -> None:
        """The store is back: a profile backing off because of it retries now."""
        session = self.profile.session
        if session.failures and session.can_refresh and not session.login_required:
            session.refresh_due(now)
            self.profile.plan()
