"""Fleet mode's shell: carries out `rotation`'s decisions against Redis for the daemon.

`Fleet` is one per daemon: the connection pool, the subscription to new generations,
the periodic poll (the fallback when a message is missed, and the way a node notices
that Redis restarted empty or came back), the heartbeat, and the store's health.
`SharedLink` is one per shared profile: the `Link` its `Profile` consults.

Adoption is synchronous (`Profile.adopt`), so it never waits for the profile's lock: a
node waiting for another's lease learns of its commit the moment the message arrives.
Every task the fleet starts catches the store's failures itself: Redis going away makes
profiles degraded, never stops the daemon.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import trio
from coredis.retry import NoRetryPolicy

from ..errors import FleetUnavailable
from ..log import events
from ..sealing import Keyring, SealError, is_sealed
from ..store import Record
from ..wallclock import WallClock
from . import rotation
from .config import ClusterConfig
from .redis_store import RedisStore, Stored, StoreFailure, announcement, first_leaf

if TYPE_CHECKING:
    from ..profile import Profile

log = events("broker.fleet")

#: A node is "seen recently" if its heartbeat is at most this many poll intervals old.
_RECENT_POLLS: Final = 3
#: A node holding only a session read from its own disk waits this many polls for a
#: node that learned a generation from the store to republish first.
_DISK_REPUBLISH_POLLS: Final = 2
_RESUBSCRIBE_CAP: Final = 5.0


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


class Fleet:
    def __init__(self, config: ClusterConfig, keys: Callable[[], Keyring], wall: WallClock) -> None:
        self.config = config
        #: The daemon's keyring as it is now (a reload may bring a new key): the same
        #: sealing layer as the session files, so a session sealed by one opens in both.
        self.keys = keys
        self.wall = wall
        self.store = RedisStore(config)
        self.links: dict[str, SharedLink] = {}
        #: None until the first exchange with the store.
        self.healthy: bool | None = None
        self.last_error: str | None = None
        self.nodes: dict[str, float] = {}
        self.store_now = 0.0
        self._nursery: trio.Nursery | None = None
        self._poke = trio.Event()

    def __repr__(self) -> str:
        return f"Fleet({self.config.display_url!r}, node={self.config.node!r})"

    # -- profiles ------------------------------------------------------------------------

    def attach(self, profile: Profile, record: Record | None) -> SharedLink:
        """Share `profile`. `record` is what this node's disk held at start, republished
        only if the store turns out to have nothing better."""
        link = SharedLink(self, profile)
        if record is not None:
            link.blob = link.seal(record)
        self.links[profile.name] = link
        profile.fleet = link
        return link

    # -- running -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled. Started once the first poll has synced every shared profile
        (or failed: the daemon starts degraded rather than not at all)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._keep_pool)
            await self.poll_once()
            nursery.start_soon(self._subscriber)
            nursery.start_soon(self._poller)
            log.info(
                "fleet_started",
                store=self.config.display_url,
                node=self.config.node,
                shared=len(self.links),
                healthy=self.healthy,
            )
            task_status.started()

    async def _keep_pool(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Hold the connection pool open, and open a new one if it dies.

        coredis runs each connection as a task in the pool's task group; an error
        there that it does not expect ends the whole group, and every later command
        fails. The fleet must outlive any such error, so the pool is supervised.
        """
        started, delay = False, 0.1
        while True:
            client = self.store.renew()
            try:
                async with client:
                    if not started:
                        started = True
                        task_status.started()
                    await trio.sleep_forever()
            except Exception as exc:  # whatever ended the pool: renew it
                self.failed(first_leaf(exc))
                log.warning("store_pool_renewed", reason=_reason(first_leaf(exc)))
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, _RESUBSCRIBE_CAP)

    def spawn(self, fn: Any, *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    async def _poller(self) -> None:
        while True:
            with trio.move_on_after(self.config.poll_interval):
                await self._poke.wait()
            self._poke = trio.Event()
            await self.poll_once()

    async def poll_once(self) -> None:
        """Heartbeat, then every shared profile's generation and lease holder."""
        try:
            self.nodes, self.store_now = await self.store.heartbeat()
            polled = await self.store.poll(list(self.links))
        except StoreFailure as exc:
            self.failed(exc)
            return
        self.succeeded()
        for name, seen in polled.items():
            link = self.links.get(name)
            if link is not None:
                link.polled(seen.generation, seen.lease_node)

    async def _subscriber(self) -> None:
        delay = 0.1
        while True:
            try:
                client = self.store.subscriber()
                async with (
                    client,
                    client.pubsub(
                        channels=[self.store.channel],
                        ignore_subscribe_messages=True,
                        retry_policy=NoRetryPolicy(),
                    ) as pubsub,
                ):
                    delay = 0.1
                    self._poke.set()  # catch up on what was said while unsubscribed
                    async for message in pubsub:
                        self._announced(message.get("data"))
            except Exception as exc:  # coredis raises groups too: resubscribe on any
                self.failed(first_leaf(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, _RESUBSCRIBE_CAP)

    def _announced(self, data: object) -> None:
        if not isinstance(data, bytes) or (announced := announcement(data)) is None:
            return
        name, stored = announced
        link = self.links.get(name)
        if link is not None:
            link.announced(stored)

    # -- health --------------------------------------------------------------------------

    def failed(self, exc: BaseException) -> None:
        reason = _reason(exc)
        if self.healthy is not False:
            log.error("store_unreachable", store=self.config.display_url, reason=reason)
        self.healthy, self.last_error = False, reason

    def succeeded(self) -> None:
        if self.healthy is False:
            log.info("store_recovered", store=self.config.display_url)
            now = self.wall.now()
            for link in self.links.values():
                link.settle()
                link.retry_soon(now)
        self.healthy, self.last_error = True, None

    def unavailable(self, exc: BaseException) -> FleetUnavailable:
        self.failed(exc)
        return FleetUnavailable(
            f"the fleet store {self.config.display_url} is unreachable: {_reason(exc)}"
        )

    def health(self) -> dict[str, Any]:
        window = _RECENT_POLLS * self.config.poll_interval
        return {
            "store": self.config.display_url,
            "node": self.config.node,
            "healthy": self.healthy,
            "last_error": self.last_error,
            "nodes": rotation.recent_nodes(self.nodes, self.store_now, window),
        }


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
            log.error("fleet_record_unreadable", profile=self.name, reason=_reason(exc))
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
            session.next_refresh_at = now
            self.profile.plan()
