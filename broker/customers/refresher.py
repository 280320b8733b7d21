"""Refreshing and ending customer sessions: single flight, per-app bounds, purges.

- One flight per session: every caller of `refresh` for a session awaits the same
  attempt, which runs in the refresher's own nursery, so a caller that goes away (a
  closed connection) cancels nothing; the rotated token is committed all the same.
- Per app, at most `max_refreshes` flights talk to Geins at once. trio's
  CapacityLimiter queues in FIFO order and a session has at most one flight queued, so
  the waiting is fair across sessions.
- A session in use is refreshed at its rotation point (model/refresh.py); one idle
  longer than `active_for` leaves the queue and is refreshed at its next use. The
  refreshes due within one `START_TICK` start together, so their commits share an
  fsync (a refresh a request waits for starts at once, and no commit is delayed).
- A refresh runs inside the store's `rotating` block: in fleet mode that holds the
  session's lease (one refresh per rotation fleet-wide) and re-reads the record; a
  newer generation committed by another node is adopted instead of refreshing, and the
  commit is a compare-and-set on the generation read (contract.py). A record whose
  sealed generation is not the one the store files it under, or that is older than
  the one held (a replay), is refused and written over.
- Tokens a failed commit left in memory (`unsaved`) are committed again by the next
  flight, not replaced by new ones from Geins.
- A refresh token Geins rejects is first checked against the store: if another node
  (or daemon) committed a newer generation, that one is adopted; otherwise the session
  has been revoked and ends. A commit that loses its compare-and-set does the same.
- Ending a session never writes it back: `ended` is set before anything is awaited,
  and a flight checks it before queuing its commit (the writer is FIFO, so a deletion
  queued after a commit wins). Nor is it read back: until its deletion is committed
  the `LiveMap` keeps any load of it out of memory (live.py).
- Purges log the session out at Geins through a bounded queue and `max_purges`
  workers per app; when the queue is full the logout is skipped and counted (the
  refresh token then dies at its maxAge).
"""

from __future__ import annotations

import contextlib
import heapq
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import trio

from broker.core.clock import WallClock
from broker.core.errors import (
    BrokerFault,
    GeinsError,
    MalformedAnswer,
    RefreshTokenRejected,
    Relayed,
    StoreError,
    UnknownSession,
    UnusableGrant,
)
from broker.core.sealing import Keyring
from broker.core.secret import Secret
from broker.customers.contract import CommitConflict, Current, Row, SessionStore
from broker.customers.live import Flight, Live, LiveMap
from broker.customers.model import record as records
from broker.customers.model import refresh as rules
from broker.customers.model.app import AppSettings
from broker.customers.model.errors import RecordUnreadable
from broker.customers.model.handles import log_id
from broker.customers.model.lifetime import EndReason
from broker.customers.model.record import SessionRecord
from broker.geins.protocol import Grant
from broker.observe.log import events
from broker.policy.session import Tokens

log = events("broker.customers")
#: Proactive refreshes due within this many seconds of each other start together, so
#: their commits share a group (one fsync) in the store.
START_TICK: Final = 0.25
#: Logouts waiting for a purge worker, per app; past it they are skipped (and counted).
PURGE_QUEUE: Final = 4096


class GeinsApi(Protocol):
    """What the refresher and the manager need of Geins (sessions/geins_client.py's
    GeinsClient, one per app)."""

    async def login(self, username: str, password: Secret, *, remember: bool) -> Grant: ...
    async def refresh(self, refresh_token: Secret) -> Grant: ...
    async def change_password(
        self, refresh_token: Secret, username: str, password: Secret, new_password: Secret
    ) -> Grant: ...
    async def register(
        self, username: str, password: Secret, user: Mapping[str, Any] | None = None
    ) -> Grant: ...
    async def logout(self, refresh_token: Secret) -> None: ...


#: A call that turns the session's refresh token into a new grant (refresh, passwd).
Rotation = Callable[[Live], Awaitable[Grant]]


@dataclass(slots=True)
class CustomerStats:
    """Counts by app and result, for metrics and `status`."""

    logins: Counter[tuple[str, str]] = field(default_factory=Counter)
    registrations: Counter[tuple[str, str]] = field(default_factory=Counter)
    refreshes: Counter[tuple[str, str]] = field(default_factory=Counter)
    ends: Counter[tuple[str, str]] = field(default_factory=Counter)
    rate_limited: Counter[str] = field(default_factory=Counter)
    purges_skipped: Counter[str] = field(default_factory=Counter)
    #: Rows in the store per app (kept as they are created and deleted).
    sessions: Counter[str] = field(default_factory=Counter)


class Refresher:
    """The refresh flights of every customer session (the module docstring's rules).

    Over the house's ~300 lines, on purpose: one flight per session, the per-app
    limit, the proactive schedule, adoption of another node's generation and the
    purges share one invariant: no session is refreshed twice at once or written back
    once ended; split, each part would have to re-check what the others hold.
    """

    def __init__(
        self,
        apps: Mapping[str, AppSettings],
        clients: Mapping[str, GeinsApi],
        store: SessionStore,
        lives: LiveMap,
        keyring: Keyring,
        *,
        wall: WallClock,
        rng: random.Random,
        stats: CustomerStats,
    ) -> None:
        self._apps = apps
        self._clients = clients
        self._store = store
        self._lives = lives
        self._keyring = keyring
        self._wall = wall
        self._rng = rng
        self.stats = stats
        self._limiters = {name: trio.CapacityLimiter(a.max_refreshes) for name, a in apps.items()}
        #: (due, session id): ids are unique, so they break ties without a counter
        #: (an entry per session in use: every byte counts).
        self._heap: list[tuple[float, bytes]] = []
        self._wake = trio.Event()
        channels = {name: trio.open_memory_channel[Secret](PURGE_QUEUE) for name in apps}
        self._purge_in = {name: pair[0] for name, pair in channels.items()}
        self._purge_out = {name: pair[1] for name, pair in channels.items()}
        self._nursery: trio.Nursery | None = None
        #: Flights under way, and set when none is (what a shutdown waits for).
        self.in_flight = 0
        self._landed = trio.Event()
        #: Set by `drain`: no proactive refresh starts any more.
        self.draining = False
        self.start_tick = START_TICK

    async def drained(self) -> None:
        """Return once no flight is under way (their commits included)."""
        while self.in_flight:
            self._landed = trio.Event()
            await self._landed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for name, app in self._apps.items():
                for _ in range(app.max_purges):
                    nursery.start_soon(self._purge_worker, name)
            nursery.start_soon(self._schedule_loop)
            task_status.started()

    # -- building rows -----------------------------------------------------------------------

    def row(self, live: Live, record: SessionRecord) -> Row:
        sid = live.session_id
        return Row(
            session_id=sid,
            app=live.app,
            customer_id=self._store.store_key.customer_id(live.app, live.username),
            name=records.seal_name(self._keyring, live.app, sid, live.username),
            remember=live.remember,
            created_at=live.created_at,
            last_used_at=live.last_used_at,
            ends_at=record.session_ends_at,
            record=records.seal(record, self._keyring, sid, live.key),
            generation=record.generation,
        )

    # -- single flight -------------------------------------------------------------------------

    async def refresh(self, live: Live, rotation: Rotation | None = None) -> None:
        """Refresh `live` (or run `rotation`, e.g. a password change, as its own flight,
        after any flight under way). Returns once the new tokens are on disk."""
        flight = live.flight
        while rotation is not None and flight is not None:
            await flight.done.wait()
            flight = live.flight
        if flight is None:
            if live.ended:
                raise UnknownSession()
            assert self._nursery is not None, "the refresher is not running"
            flight = live.flight = Flight()
            self._nursery.start_soon(self._fly, live, flight, rotation)
        await flight.done.wait()
        error = flight.error
        if isinstance(error, BrokerFault):
            raise Relayed(error.code, str(error))
        if error is not None:
            raise error

    async def _fly(self, live: Live, flight: Flight, rotation: Rotation | None) -> None:
        app = self._apps[live.app]
        outcome = "error"
        # Tokens a failed commit left unsaved are the newest (Geins has spent the ones
        # the store holds): they are committed again, and Geins is not asked for new
        # ones, which would rotate the session once per request while the store fails.
        resave = rotation is None and live.unsaved
        self.in_flight += 1
        try:
            async with self._limiters[live.app]:
                outcome = await self._rotate(live, app, rotation, resave=resave)
        except RefreshTokenRejected as exc:
            outcome = "adopted" if await self._adopt(live) else "rejected"
            if outcome == "rejected":
                flight.error = exc
                with contextlib.suppress(StoreError):
                    await self.end(live, EndReason.REVOKED, purge=False, wait_flight=False)
        except CommitConflict as exc:
            # Our lease lapsed and another node committed, or the session was ended.
            outcome = "adopted" if await self._adopt(live) else "conflict"
            if outcome == "conflict":
                flight.error = exc
                log.warning(
                    "customer_commit_conflict", app=live.app, session=log_id(live.session_id)
                )
        except UnusableGrant as exc:
            flight.error = exc
            await self._keep_refresh_token(live, exc.refresh, app, rotation)
        except (GeinsError, StoreError, UnknownSession) as exc:
            flight.error = exc
            if rotation is None and isinstance(exc, GeinsError):
                self._failed(live, app, exc)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            if rotation is None and not resave:
                self.stats.refreshes[live.app, outcome] += 1
            live.flight = None
            flight.done.set()
            self.in_flight -= 1
            if not self.in_flight:
                self._landed.set()
            self.consider(live, self._wall.now())

    async def _rotate(
        self, live: Live, app: AppSettings, rotation: Rotation | None, *, resave: bool
    ) -> str:
        """One refresh (or `rotation`) under the store's `rotating` block: adopt what
        another node committed, commit again tokens a failed commit left unsaved
        (`resave`), or exchange the refresh token and commit the result."""
        if live.ended:
            raise UnknownSession()
        async with self._store.rotating(live.app, live.session_id) as current:
            expected = self._expected(live, current)
            if expected is None and current.read:  # another node's newer generation
                if rotation is None:
                    return "adopted"
                expected = live.generation  # a password change goes on from it
            if resave:
                await self.save(live, live.held(self._wall.now()), expected)
                due = rules.rotation_due_at(self._tokens(live), app.policy, self._rng)
                live.next_refresh_at = due
                return "ok"
            client = self._clients[live.app]
            grant = await (client.refresh(live.refresh) if rotation is None else rotation(live))
            return await self._took_grant(live, grant, app, expected)

    def _expected(self, live: Live, current: Current) -> int | None:
        """What the store holds under the lease, as the generation to compare-and-set
        against; None when there is nothing to refresh (a newer generation was adopted)
        or nothing was read (one writer). Raises UnknownSession if the session is gone
        (ended on another node)."""
        if not current.read:
            return None
        row = current.row
        if row is None or row.generation is None:
            self.dropped(live)
            raise UnknownSession()
        if row.generation > live.generation and self._adopt_row(live, row):
            return None
        if row.generation < live.generation and not live.unsaved:
            self._refused(live, "older than the generation held")
        return row.generation

    def dropped(self, live: Live) -> None:
        """The session is gone from the store (ended elsewhere): forget it here too."""
        live.ended = True
        if self._lives.peek(live.session_id) is live:
            self._lives.pop(live.session_id)

    async def _took_grant(
        self, live: Live, grant: Grant, app: AppSettings, expected: int | None = None
    ) -> str:
        now = self._wall.now()
        try:
            token_set = Tokens.from_grant(grant, now, app.policy.max_clock_skew)
        except MalformedAnswer as exc:
            # Geins rotated: the old refresh token is spent, the new one must be kept.
            raise UnusableGrant(str(exc), grant.refresh) from None
        record = live.record(
            bearer=grant.bearer,
            refresh=grant.refresh,
            obtained_at=now,
            expires_at=token_set.expires_at,
            session_ends_at=token_set.session_expires_at,
            committed_at=now,
        )
        await self.save(live, record, expected)
        live.failures, live.retry_at = 0, None
        live.next_refresh_at = rules.rotation_due_at(token_set, app.policy, self._rng)
        return "ok"

    async def save(self, live: Live, record: SessionRecord, expected: int | None = None) -> None:
        """Commit `record` (compare-and-set against `expected` where the store has
        generations) and then make it the one served. An ended session is not written
        back (its newest refresh token is still kept in memory for the logout). A lost
        compare-and-set raises CommitConflict and keeps nothing of `record`."""
        if live.ended:
            live.took(record)
            raise UnknownSession()
        try:
            await self._store.commit(self.row(live, record), expected=expected)
        except CommitConflict:
            raise
        except StoreError:
            live.took(record)
            live.unsaved = True
            raise
        live.took(record)
        live.unsaved = False

    async def _keep_refresh_token(
        self, live: Live, refresh: Secret, app: AppSettings, rotation: Rotation | None
    ) -> None:
        """An answer with a new refresh token and nothing usable besides: keep the
        token (with the bearer we had), so the session survives the bad answer."""
        now = self._wall.now()
        record = live.record(
            bearer=live.bearer,
            refresh=refresh,
            obtained_at=live.obtained_at,
            expires_at=live.expires_at,
            session_ends_at=live.session_ends_at,
            committed_at=now,
        )
        with contextlib.suppress(StoreError, UnknownSession):
            await self.save(live, record)
        if rotation is None:
            self._failed(live, app, MalformedAnswer("unusable answer"))

    def _failed(self, live: Live, app: AppSettings, exc: GeinsError) -> None:
        retry_after = getattr(exc, "retry_after", None)
        retry = rules.retry_after_failure(
            self._tokens(live),
            live.failures,
            self._wall.now(),
            app.policy,
            self._rng,
            retry_after=retry_after,
        )
        live.failures, live.retry_at = retry.failures, retry.at
        log.warning(
            "customer_refresh_failed",
            app=live.app,
            session=log_id(live.session_id),
            failures=live.failures,
            reason=str(exc),
        )

    async def _adopt(self, live: Live) -> bool:
        """Whether the store holds a newer generation of `live` (another node rotated
        it): if so it becomes the session's tokens."""
        try:
            row = await self._store.get(live.app, live.session_id)
        except StoreError:
            return False
        return row is not None and self._adopt_row(live, row)

    def _adopt_row(self, live: Live, row: Row) -> bool:
        """Adopt `row`'s record if it opens, is filed under its sealed generation (where
        the store files one) and is newer than what `live` holds. Anything else is
        refused: a replayed record is older than what the node holds, or filed under a
        generation other than its sealed one."""
        try:
            record, _ = records.open_record(
                row.record, self._keyring, live.app, live.session_id, live.key
            )
        except RecordUnreadable as exc:
            self._refused(live, str(exc))
            return False
        if row.generation is not None and row.generation != record.generation:
            self._refused(live, "filed under a generation other than its sealed one")
            return False
        if record.generation <= live.generation:
            if record.generation < live.generation:
                self._refused(live, "older than the generation held")
            return False
        live.took(record)
        live.failures, live.retry_at = 0, None
        app = self._apps[live.app]
        live.next_refresh_at = rules.rotation_due_at(self._tokens(live), app.policy, self._rng)
        log.info("customer_session_adopted", app=live.app, session=log_id(live.session_id))
        return True

    @staticmethod
    def _refused(live: Live, why: str) -> None:
        log.warning(
            "customer_record_refused", app=live.app, session=log_id(live.session_id), reason=why
        )

    @staticmethod
    def _tokens(live: Live) -> Tokens:
        return rules.tokens(
            live.bearer, live.refresh, live.obtained_at, live.expires_at, live.session_ends_at
        )

    # -- proactive refresh of sessions in use -----------------------------------------------------

    def consider(self, live: Live, now: float) -> None:
        """Queue `live` for its next proactive refresh if it is in use."""
        if live.ended or live.scheduled or live.flight is not None:
            return
        app = self._apps[live.app]
        if not app.lifetime.active(live.last_used_at, now):
            return
        due = live.retry_at if live.failures else live.next_refresh_at
        if due is None:
            due = live.next_refresh_at = rules.rotation_due_at(
                self._tokens(live), app.policy, self._rng
            )
        live.scheduled = True
        earlier = not self._heap or due < self._heap[0][0]
        heapq.heappush(self._heap, (due, live.session_id))
        if earlier:
            self._wake.set()

    async def _schedule_loop(self) -> None:
        while True:
            if not self._heap:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            due = self._heap[0][0]
            wait = due - self._wall.now()
            if wait > 0:
                with trio.move_on_after(wait):
                    await self._wake.wait()
                    self._wake = trio.Event()
                continue
            self._start_due(self._wall.now() + self.start_tick)

    def _start_due(self, horizon: float) -> None:
        """Start every proactive refresh due by `horizon` (now and the next tick's),
        together: their commits then reach the store's writer together and share one
        fsync, while each rotated token is still committed the moment Geins answers.
        A refresh starts at most a tick before its time, well before its bearer's
        expiry (the rotation point is earlier still)."""
        assert self._nursery is not None
        while self._heap and self._heap[0][0] <= horizon:
            _, session_id = heapq.heappop(self._heap)
            live = self._lives.peek(session_id)
            if live is None or live.ended or not live.scheduled:
                continue
            live.scheduled = False
            now = self._wall.now()
            next_at = live.retry_at if live.failures else live.next_refresh_at
            if next_at is not None and next_at > horizon:
                self.consider(live, now)
            elif not self.draining and self._apps[live.app].lifetime.active(live.last_used_at, now):
                self._nursery.start_soon(self._proactive, live)

    async def _proactive(self, live: Live) -> None:
        # A failure is logged and counted by the flight; the next use or retry takes over.
        with contextlib.suppress(BrokerFault):
            await self.refresh(live)

    # -- ending sessions ---------------------------------------------------------------------

    async def end(
        self, live: Live, reason: EndReason, *, purge: bool, wait_flight: bool = True
    ) -> None:
        """End `live`: out of memory, out of the store, and (`purge`) logged out at
        Geins in the background."""
        if live.ended:
            return
        live.ended = True
        self._lives.pop(live.session_id)
        with self._lives.ending([live.session_id]):
            if wait_flight and live.flight is not None:
                await live.flight.done.wait()
            if purge:
                self.purge(live.app, live.refresh)
            await self.forget([live.session_id], live.app, reason)

    async def forget(self, session_ids: list[bytes], app: str, reason: EndReason) -> None:
        """Delete stored sessions (ended ones, or ones no handle has opened yet).
        Counts only what was still there: the sweeper and a request may end one
        session at once."""
        if not session_ids:
            return
        with self._lives.ending(session_ids):
            gone = await self._store.delete_many(app, session_ids)
        self.stats.sessions[app] -= gone
        self.stats.ends[app, reason.value] += gone
        for session_id in session_ids:
            log.info("customer_session_ended", app=app, session=log_id(session_id), reason=reason)

    def purge(self, app: str, refresh_token: Secret) -> None:
        try:
            self._purge_in[app].send_nowait(refresh_token)
        except trio.WouldBlock:
            self.stats.purges_skipped[app] += 1

    async def _purge_worker(self, app: str) -> None:
        client = self._clients[app]
        async for refresh_token in self._purge_out[app]:
            try:
                await client.logout(refresh_token)
            except GeinsError as exc:
                log.info("customer_purge_logout_failed", app=app, reason=str(exc))
