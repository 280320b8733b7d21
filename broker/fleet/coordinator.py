"""Fleet mode's shell: carries out `rotation`'s decisions against Redis for the daemon.

`Fleet` is one per daemon: the connection pool, the subscription to new generations,
the periodic poll (the fallback when a message is missed, and the way a node notices
that Redis restarted empty or came back), the heartbeat, and the store's health.
`SharedLink` (shared_link.py) is one per shared profile: the `Link` its `Profile`
consults.

Adoption is synchronous (`Profile.adopt`), so it never waits for the profile's lock: a
node waiting for another's lease learns of its commit the moment the message arrives.
Every task the fleet starts catches the store's failures itself: Redis going away makes
profiles degraded, never stops the daemon.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import trio
from coredis.retry import NoRetryPolicy

from broker.core.clock import WallClock
from broker.core.errors import FleetUnavailable
from broker.core.sealing import Keyring
from broker.fleet.redis_store import RedisStore, StoreFailure, announcement, first_leaf
from broker.fleet.settings import ClusterConfig
from broker.fleet.shared_link import SharedLink, reason
from broker.observe.log import events
from broker.policy import rotation
from broker.storage.store import Record

if TYPE_CHECKING:
    from broker.sessions.profile import Profile

log = events("broker.fleet")

#: A node is "seen recently" if its heartbeat is at most this many poll intervals old.
_RECENT_POLLS: Final = 3
_RESUBSCRIBE_CAP: Final = 5.0


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
            link.hold_from_disk(record)
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
                log.warning("store_pool_renewed", reason=reason(first_leaf(exc)))
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
            window = _RECENT_POLLS * self.config.poll_interval
            self.nodes, self.store_now = await self.store.heartbeat(window)
            polled = await self.store.poll(list(self.links))
        except StoreFailure as exc:
            self.failed(exc)
            return
        self.succeeded()
        for name, seen in polled.items():
            link = self.links.get(name)
            if link is not None:
                link.polled(seen)

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
        why = reason(exc)
        if self.healthy is not False:
            log.error("store_unreachable", store=self.config.display_url, reason=why)
        self.healthy, self.last_error = False, why

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
            f"the fleet store {self.config.display_url} is unreachable: {reason(exc)}"
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
