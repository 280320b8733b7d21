"""The door of an HTTP listener, shared by the observability server and the Merchant
API proxy: accepting without spinning when the process is out of resources, and
turning peers away without letting one that connects in a loop flood the log."""

from __future__ import annotations

import errno
from typing import Final

import trio

from broker.observe.log import Events

#: accept() errors that mean "out of resources" (trio's ACCEPT_CAPACITY_ERRNOS).
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_ACCEPT_PAUSE: Final = 0.1
#: Connections turned away are logged at most once per this many seconds per reason
#: (with how many since): a peer that connects in a loop must not flood the log.
_REFUSAL_LOG_INTERVAL: Final = 10.0
#: A peer turned away at the door may linger this long (its request read and dropped),
#: at most this many at once.
DOOR_LINGER: Final = 0.5
MAX_LINGERING: Final = 64


async def accept_or_pause(
    listener: trio.socket.SocketType, name: str, log: Events
) -> trio.socket.SocketType | None:
    """The next connection on `listener`, or None after a short pause when the process
    is out of resources (no file descriptor, no memory): the listener stays readable
    then, so accepting again at once would spin. Any other accept() error is raised, and
    trio.ClosedResourceError says the owner closed the listener."""
    try:
        sock, _ = await listener.accept()
    except OSError as exc:
        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
            raise
        log.warning("accept_paused", listener=name, reason=exc.strerror)
        await trio.sleep(_ACCEPT_PAUSE)
        return None
    return sock


class RefusalLog:
    """`connection_refused` lines of one listener, at most one per reason per
    `_REFUSAL_LOG_INTERVAL` seconds (of trio's clock), each saying how many it stands
    for."""

    def __init__(self, listener: str, log: Events) -> None:
        self.listener = listener
        self.log = log
        #: Per reason: when it was last logged, and how many went unlogged since.
        self._reasons: dict[str, tuple[float, int]] = {}

    def refused(self, reason: str) -> None:
        now = trio.current_time()
        logged_at, unlogged = self._reasons.get(reason, (-_REFUSAL_LOG_INTERVAL, 0))
        if now - logged_at < _REFUSAL_LOG_INTERVAL:
            self._reasons[reason] = (logged_at, unlogged + 1)
            return
        self._reasons[reason] = (now, 0)
        self.log.warning(
            "connection_refused", listener=self.listener, reason=reason, since=unlogged + 1
        )
