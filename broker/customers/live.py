"""The sessions in memory: one small object per live session, in a bounded LRU map.

A `Live` is kept small on purpose (slots, no per-session Session, Random or Tokens
object; claims are decoded again when asked for): the memory goal is at most 2 KiB per
live session in the whole daemon, bearer included. So:

- the tokens are kept bare (a `Secret` around each would cost 80 bytes a session), the
  bearer packed by model/compact.py (a quarter smaller), and handed out wrapped:
  `bearer` and `refresh` make a `Secret` when read; the repr shows neither;
- it holds the session's handle, so the daemon can re-seal the record after a proactive
  refresh (`key` derives the session key for each seal) and log the session out at
  Geins on a purge. The handle's string is the very one `CustomerSessions` finds the
  session by, so holding it costs a reference where the key cost 72 bytes. Dropping a
  `Live` from the map forgets the handle, and the session waits, sealed, until its
  handle is seen again.

Only the manager and its refresher change a `Live`'s fields.

A session that ends is out of the map at once, but its row stays in the store until
its deletion is committed, and a load of it may be reading that row meanwhile (or
have begun to before it ended). The map keeps such a load from bringing it back:
while an end is under way its id is `ending`, and a load in flight when it began is
doomed; `load_done` puts neither in the map. Without this a `Live` read from the
doomed row would outlive the deletion, serving and refreshing a session that ended.
"""

from __future__ import annotations

import contextlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator

import trio

from broker.core.secret import Secret
from broker.customers.model import compact
from broker.customers.model.handles import session_key
from broker.customers.model.record import SessionRecord


class Flight:
    """One refresh (or password change) of one session, awaited by any number."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class Live:
    """One customer session held in memory: its tokens, times and refresh state.

    A record of slots, not a class with behaviour to split: a daemon holds up to a
    hundred thousand of these (benchmarks/README.md measures each under 2 KiB), and
    the `session_token` hot path reads several fields per answer; sub-objects would
    cost memory and a lookup per field.
    """

    __slots__ = (
        "_bearer",
        "_handle",
        "_refresh",
        "app",
        "created_at",
        "ended",
        "expires_at",
        "failures",
        "flight",
        "generation",
        "last_used_at",
        "next_refresh_at",
        "obtained_at",
        "remember",
        "retry_at",
        "saved_use_at",
        "scheduled",
        "session_ends_at",
        "session_id",
        "unsaved",
        "username",
    )

    def __init__(
        self,
        session_id: bytes,
        handle: str,
        record: SessionRecord,
        last_used_at: float,
    ) -> None:
        self.session_id = session_id
        self._handle = handle
        self.app = record.app
        self.username = record.username
        self.remember = record.remember
        self.created_at = record.created_at
        self._bearer = compact.pack(record.bearer.reveal())
        self._refresh = record.refresh.reveal()
        self.obtained_at = record.obtained_at
        self.expires_at = record.expires_at
        self.session_ends_at = record.session_ends_at
        self.generation = record.generation
        self.last_used_at = last_used_at
        #: The last use written to the store (it is written coarsely).
        self.saved_use_at = last_used_at
        self.next_refresh_at: float | None = None
        self.failures = 0
        self.retry_at: float | None = None
        self.flight: Flight | None = None
        #: In the refresher's queue.
        self.scheduled = False
        #: Ended (logout, purge, eviction): nothing may write it back.
        self.ended = False
        #: Holds tokens the store has not taken yet (a failed commit).
        self.unsaved = False

    def __repr__(self) -> str:
        return f"Live(app={self.app!r}, generation={self.generation})"

    @property
    def bearer(self) -> Secret:
        return Secret(compact.unpack(self._bearer))

    @property
    def refresh(self) -> Secret:
        return Secret(self._refresh)

    @property
    def handle(self) -> str:
        """The handle (memory only, like the key it leads to; never logged)."""
        return self._handle

    @property
    def key(self) -> bytes:
        """The session key its record is sealed under (handles.py)."""
        return session_key(self.app, Secret(self._handle))

    def took(self, record: SessionRecord) -> None:
        """The session's tokens are now `record`'s."""
        self._bearer = compact.pack(record.bearer.reveal())
        self._refresh = record.refresh.reveal()
        self.obtained_at = record.obtained_at
        self.expires_at = record.expires_at
        self.session_ends_at = record.session_ends_at
        self.generation = record.generation

    def held(self, committed_at: float) -> SessionRecord:
        """The record of the tokens held now, as it was meant to be committed (a failed
        commit leaves them in memory only: `unsaved`)."""
        return SessionRecord(
            app=self.app,
            username=self.username,
            remember=self.remember,
            bearer=self.bearer,
            refresh=self.refresh,
            obtained_at=self.obtained_at,
            expires_at=self.expires_at,
            session_ends_at=self.session_ends_at,
            created_at=self.created_at,
            generation=self.generation,
            committed_at=committed_at,
        )

    def record(
        self,
        *,
        bearer: Secret,
        refresh: Secret,
        obtained_at: float,
        expires_at: float,
        session_ends_at: float | None,
        committed_at: float,
    ) -> SessionRecord:
        """The next generation of this session's record, with these tokens."""
        return SessionRecord(
            app=self.app,
            username=self.username,
            remember=self.remember,
            bearer=bearer,
            refresh=refresh,
            obtained_at=obtained_at,
            expires_at=expires_at,
            session_ends_at=session_ends_at,
            created_at=self.created_at,
            generation=self.generation + 1,
            committed_at=committed_at,
        )


def _nothing(live: Live) -> None:
    pass


class LiveMap:
    """Live sessions by id, least recently used first, at most `capacity` of them."""

    def __init__(self, capacity: int, left: Callable[[Live], None] | None = None) -> None:
        self.capacity = capacity
        #: Told of every `Live` that leaves the map (dropped for room or popped), so
        #: that what finds sessions without the map (the manager's hot path) forgets it.
        self._left: Callable[[Live], None] = left or _nothing
        self._map: OrderedDict[bytes, Live] = OrderedDict()
        #: Ids whose end is under way, with how many ends (a logout, the sweeper and an
        #: admin may end one session at once).
        self._ending: Counter[bytes] = Counter()
        #: Ids being loaded from the store (the manager loads one id at a time), and
        #: those of them whose session ended during the load.
        self._loads: set[bytes] = set()
        self._doomed: set[bytes] = set()

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Iterator[Live]:
        return iter(list(self._map.values()))

    def get(self, session_id: bytes) -> Live | None:
        live = self._map.get(session_id)
        if live is not None:
            self._map.move_to_end(session_id)
        return live

    def peek(self, session_id: bytes) -> Live | None:
        return self._map.get(session_id)

    def put(self, live: Live) -> None:
        """Hold `live`, the most recently used; the least recently used beyond the
        capacity are dropped (their sessions wait, sealed, in the store)."""
        self._map[live.session_id] = live
        self._map.move_to_end(live.session_id)
        while len(self._map) > self.capacity:
            _, oldest = self._map.popitem(last=False)
            oldest.scheduled = False
            self._left(oldest)

    def touch(self, live: Live) -> None:
        """`live`, held, is now the most recently used."""
        if self._map.get(live.session_id) is live:
            self._map.move_to_end(live.session_id)

    def pop(self, session_id: bytes) -> Live | None:
        live = self._map.pop(session_id, None)
        if live is not None:
            self._left(live)
        return live

    @contextlib.contextmanager
    def ending(self, session_ids: list[bytes]) -> Iterator[None]:
        """Keep `session_ids` out of the map while the block (which deletes them from
        the store) runs. Entered before the first await after the sessions end."""
        self._ending.update(session_ids)
        self._doomed.update(self._loads.intersection(session_ids))
        try:
            yield
        finally:
            self._ending.subtract(session_ids)
            for session_id in session_ids:
                if self._ending[session_id] <= 0:
                    del self._ending[session_id]

    def load_started(self, session_id: bytes) -> None:
        self._loads.add(session_id)

    def load_done(self, session_id: bytes, live: Live | None) -> bool:
        """End the load of `session_id`: `live` (what it read, if anything) goes into
        the map unless the session ended since the load began. Whether it went in."""
        self._loads.discard(session_id)
        ended = session_id in self._doomed or session_id in self._ending
        self._doomed.discard(session_id)
        if live is None or ended:
            return False
        self.put(live)
        return True

    def count(self, app: str) -> int:
        return sum(1 for live in self._map.values() if live.app == app)
