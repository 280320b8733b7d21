"""The proxy's private epoll: every client and upstream connection, one trio task.

Some facts about this epoll
===========================

Why not a trio task per connection (as broker/http/server.py runs the emulator): a
proxied request is four socket operations (the caller's request in, Geins' request out,
Geins' answer in, the caller's answer out), and through trio each one is a scheduler
round trip plus an epoll_ctl (trio arms an fd with EPOLLONESHOT for every wait); with
h11 on top, that was ~280 us of CPU per request. Here one task (`run`) waits on this
epoll's own fd (`trio.lowlevel.wait_readable`: an epoll fd is readable while any fd in
its set is ready) and calls each ready connection's `on_event`, which does its work
without awaiting. A request whose bearer is in memory never leaves this loop; what
needs trio (a refresh, a 401's renewal, a DNS look-up, the TCP peer look-up, rendering
/metrics) is `spawn`ed as a task and calls back into its connection when done.

Who owns which fd: listening sockets stay with trio (service.py's `Door` accepts in
a task: once per connection, not per request, and the TCP peer look-up may need a
worker thread), and hands each accepted socket over. Every accepted socket belongs
to its `ClientConnection` (client.py) and every upstream socket to its `UpstreamConnection`
(upstream.py); each registers its fd once, changes its interest with `modify`, and
unregisters it in its own `close`, which runs at most once, before the socket is
closed. Nothing else registers fds here and trio never waits on them, so no fd is in
two epoll sets, and a closed fd is never left registered (its number may be reused).

Level-triggered without EPOLLONESHOT is safe because only `run` reads or writes these
sockets from a ready event, on trio's single thread, and every handler leaves its fd
either not ready or with its interest changed: a read takes what one recv returns
(what is left wakes us next round: fairness between connections), a writable socket
flushes and goes back to EPOLLIN only when its backlog is gone, and a connection that
must not read (its request is in flight, or the other side is not keeping up) turns
EPOLLIN off. Tasks that call back (`spawn`) run between rounds, never during one.

Why the loop polls until a poll comes back empty before it waits again (as the broker
socket's reactor does): what a round's own sends bring back while it runs (an
upstream's answer, a caller's next request) is served in the same wake-up, and the
empty poll clears this epoll's ready list (a served level-triggered fd stays on it
until a poll finds it no longer ready), so trio does not wake us again for nothing.

Fairness within one wake-up: polls of up to `_MAX_EVENTS` fds, until one comes back
empty (at most `_BATCHES`), run without a checkpoint (nothing on that path awaits);
then `run` waits on the epoll fd again, which always yields to trio (even when the fd
is ready, trio reports it only at its next poll), so the tasks that refresh tokens,
flush the access log and watch deadlines get their turn every round.

Time: `trio.current_time()` (so MockClock drives every timeout in tests), read
once per poll into `now`, which the connections use (a dozen clock reads per
request were measurable); a task that calls back into a connection refreshes it
first (`tick`), and `serving` tells code that may run either way (the pool's
`request`) whether `now` is already fresh. Each connection keeps one `deadline`;
`watch` tells the housekeeper, which sleeps until the earliest one, then calls
`expire(now)` on every connection past its own. A deadline moved later costs a float
store, not a timer.

Linux only, as the broker socket's reactor (broker/rpc/reactor.py).
"""

from __future__ import annotations

import math
import select
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import trio

from broker.observe.log import events

log = events("broker.proxy")

_MAX_EVENTS: Final = 1024
_BATCHES: Final = 8
IN: Final = select.EPOLLIN
OUT: Final = select.EPOLLOUT
#: Reported whatever the interest: a handler that is not reading must still act on
#: them (close), or the level-triggered fd would wake every round.
BROKEN: Final = select.EPOLLHUP | select.EPOLLERR
#: Interest in nothing: the fd stays registered, no event but BROKEN wakes us for it.
NONE: Final = 0


class Ready(Protocol):
    """What the reactor calls for a ready fd, and for a passed deadline."""

    deadline: float

    def on_event(self, events: int) -> None: ...

    def expire(self, now: float) -> None: ...

    def abort(self) -> None:
        """Close at once (a bug while serving it, or the reactor stopping)."""


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Ready] = {}
        #: Every connection that keeps a deadline (clients and upstreams).
        self._timed: set[Ready] = set()
        self._next_check = math.inf
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        #: trio's clock as of this poll (or the last `tick`).
        self.now = 0.0
        #: Whether the loop is serving a poll's events now (`now` is fresh: no `tick`).
        self.serving = False
        #: The run's clock (MockClock in tests), read without `trio.current_time`'s
        #: two calls of indirection; set when `run` starts.
        self._clock: Callable[[], float] = trio.current_time

    # -- fds --------------------------------------------------------------------------------

    def register(self, fd: int, handler: Ready, mask: int) -> None:
        self._epoll.register(fd, mask)
        self._handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self._epoll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None and not self._epoll.closed:
            self._epoll.unregister(fd)

    # -- time -------------------------------------------------------------------------------

    def track(self, conn: Ready) -> None:
        self._timed.add(conn)
        self.watch(conn.deadline)

    def untrack(self, conn: Ready) -> None:
        self._timed.discard(conn)

    def watch(self, deadline: float) -> None:
        """A connection's deadline is now `deadline` (earlier ones wake the housekeeper)."""
        if deadline < self._next_check:
            self._next_check = deadline
            self._wake.set()

    # -- trio -------------------------------------------------------------------------------

    def tick(self) -> float:
        """Read the clock now (from a task, between rounds; `serving` says whether the
        caller may be one)."""
        self.now = now = self._clock()
        return now

    def spawn(self, work: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run `work` as a trio task beside the loop (the slow path); it lives no longer
        than the reactor."""
        assert self._nursery is not None
        self._nursery.start_soon(work, *args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._clock = trio.lowlevel.current_clock().current_time
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._housekeeping)
                task_status.started()
                await self._loop()
        finally:
            # Whatever is still open ends with the reactor (its sockets are closed).
            for handler in list(self._handlers.values()):
                _abandon(handler)
            self._epoll.close()

    async def _loop(self) -> None:
        poll, handlers, clock = self._epoll.poll, self._handlers, self._clock
        while True:
            await trio.lowlevel.wait_readable(self._epoll.fileno())
            self.serving = True
            try:
                for _ in range(_BATCHES):
                    ready = poll(0, _MAX_EVENTS)
                    # Until a poll comes back empty (the design note).
                    if not ready:
                        break
                    self.now = clock()
                    for fd, mask in ready:
                        handler = handlers.get(fd)
                        if handler is None:
                            continue  # closed earlier in this round
                        try:
                            handler.on_event(mask)
                        except Exception:
                            # A bug while serving one connection ends it, never the proxy.
                            log.exception("connection_failed")
                            _abandon(handler)
            finally:
                self.serving = False

    async def _housekeeping(self) -> None:
        while True:
            now = self.tick()
            self._next_check = math.inf
            for conn in list(self._timed):
                if conn.deadline <= now:
                    try:
                        conn.expire(now)
                    except Exception:
                        log.exception("connection_failed")
                        _abandon(conn)
            for conn in self._timed:
                self._next_check = min(self._next_check, conn.deadline)
            self._wake = trio.Event()
            with trio.move_on_at(self._next_check):
                await self._wake.wait()


def _abandon(handler: Ready) -> None:
    try:
        handler.abort()
    except Exception:
        log.exception("connection_failed")
