"""Who may hold a broker connection, and how much of the daemon one may tie up.

The reactor asks here at accept() (`refusal`) and counts what connections leave unread
here, and does the closing itself. Limits, all from `[broker]` and replaced at each
reload: `max_connections`, of which the last `admin_reserved_connections` are for root
and the daemon's user, and at most `max_connections_per_uid` for any other uid (a
stranger's flood of idle connections locks out no one); a peer that may read no profile
and use no app is closed after `stranger_idle_timeout` idle; unread answers of at most
`max_unread_bytes` per connection (beyond one answer) and `max_unread_total` in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from broker.daemon.config import BrokerConfig
    from broker.rpc.ops import Api
    from broker.rpc.peercred import Peer

#: Why a connection was refused, for the metrics (a fixed set: a bounded label).
Refusal = Literal["max_per_uid", "max_connections"]
#: Peer identities whose stranger verdict is kept before the memo starts over.
_STRANGERS_KEPT: Final = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """The broker socket's limits and timeouts (seconds), as one reload sets them."""

    max_connections: int
    max_per_uid: int
    admin_reserve: int
    max_waiting: int
    max_unread: int
    max_unread_total: int
    idle_timeout: float
    stranger_idle_timeout: float
    frame_timeout: float
    send_timeout: float

    @classmethod
    def of(cls, config: BrokerConfig) -> Limits:
        return cls(
            max_connections=config.max_connections,
            max_per_uid=config.max_connections_per_uid,
            # Never more than half: a small max_connections still leaves others room.
            admin_reserve=min(config.admin_reserved_connections, config.max_connections // 2),
            max_waiting=config.max_requests_per_connection,
            max_unread=config.max_unread_bytes,
            max_unread_total=config.max_unread_total,
            idle_timeout=config.idle_timeout,
            stranger_idle_timeout=min(config.stranger_idle_timeout, config.idle_timeout),
            frame_timeout=config.frame_timeout,
            send_timeout=config.send_timeout,
        )


class Admission:
    """Connection slots per uid, the admins' reserve, strangers, the unread budget."""

    def __init__(self, api: Api, limits: Limits) -> None:
        self._api = api
        self._profiles = api.profiles  # the daemon's live table, changed in place on reload
        self.limits = limits
        #: Open connections per peer uid, and whether a peer identity may read nothing
        #: (per uid, gid and groups; forgotten at each reload).
        self._per_uid: dict[int, int] = {}
        self._strangers: dict[tuple[int, int, frozenset[int]], bool] = {}
        #: Bytes of answers queued on every connection, and connections closed for
        #: leaving too many unread (a client that never reads its watch events, say).
        self.unread = 0
        self.overflows = 0

    def configure(self, limits: Limits) -> None:
        self.limits = limits
        self._strangers = {}

    # -- slots ---------------------------------------------------------------------------

    def refusal(self, peer: Peer, open_connections: int) -> Refusal | None:
        """Why a new connection from `peer` does not fit, or None when it does. The last
        `admin_reserve` slots are for root and the daemon's user, and no other uid may
        hold more than `max_per_uid`."""
        limits = self.limits
        if self._api.is_admin(peer):
            return None if open_connections < limits.max_connections else "max_connections"
        if self._per_uid.get(peer.uid, 0) >= limits.max_per_uid:
            return "max_per_uid"
        if open_connections >= limits.max_connections - limits.admin_reserve:
            return "max_connections"
        return None

    def opened(self, uid: int) -> None:
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1

    def closed(self, uid: int) -> None:
        if (left := self._per_uid.get(uid, 1) - 1) > 0:
            self._per_uid[uid] = left
        else:
            self._per_uid.pop(uid, None)

    def is_stranger(self, peer: Peer) -> bool:
        """Whether `peer` may read no profile and use no app (so may do nothing but
        say hello)."""
        key = (peer.uid, peer.gid, peer.groups)
        stranger = self._strangers.get(key)
        if stranger is None:
            api = self._api
            sessions = api.session_ops
            stranger = (
                not api.is_admin(peer)
                and not any(api.may_read(peer, profile) for profile in self._profiles.values())
                and not any(sessions.may_use(peer, app) for app in sessions.apps.values())
            )
            if len(self._strangers) >= _STRANGERS_KEPT:
                self._strangers.clear()
            self._strangers[key] = stranger
        return stranger

    def idle_limit(self, stranger: bool) -> float:
        return self.limits.stranger_idle_timeout if stranger else self.limits.idle_timeout

    # -- unread answers ------------------------------------------------------------------

    def fits_connection(self, queued: int, adding: int) -> bool:
        """Whether a connection with `queued` unread bytes may queue `adding` more."""
        return queued + adding <= self.limits.max_unread

    def over_total(self, adding: int) -> bool:
        return self.unread + adding > self.limits.max_unread_total
