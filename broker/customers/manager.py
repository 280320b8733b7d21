"""Customer sessions, as the daemon's ops will call them.

`CustomerSessions` is the one object the wiring needs: it owns the store's writer,
the refresher and the sweeper (`run`), and offers one coroutine per op. Who may call
which app (allow_users / allow_groups) is the server's check, made before any of
these; the caller's uid is passed in for the login rate limit only.

Handles come in and go out as `Secret`s and are never logged, stored or listed; the
manager finds a session by its keyed hash (model/handles.py). A malformed handle, an
unknown one, an ended session and another app's handle all raise `UnknownSession`
along one path.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import trio

from broker.core.clock import SystemClock, WallClock
from broker.core.errors import (
    BadRequest,
    GeinsError,
    MalformedAnswer,
    RateLimited,
    StoreError,
    Transient,
    UnknownApp,
    UnknownSession,
)
from broker.core.sealing import Keyring
from broker.core.secret import Secret
from broker.customers.contract import SessionStore
from broker.customers.live import Live, LiveMap
from broker.customers.model import record as records
from broker.customers.model import refresh as rules
from broker.customers.model.app import AppSettings
from broker.customers.model.errors import RecordUnreadable
from broker.customers.model.handles import log_id, new_handle, session_key, well_formed
from broker.customers.model.lifetime import EndReason, over_limit
from broker.customers.model.ratelimit import LoginLimiter
from broker.customers.model.record import SessionRecord
from broker.customers.refresher import CustomerStats, GeinsApi, Refresher, log
from broker.geins import claims
from broker.geins.protocol import Grant
from broker.policy.session import Tokens
from broker.sessions.geins_client import GeinsClient
from geins_broker_client.protocol import PreparedResponse

#: Sessions held in memory at most (all apps); others wait, sealed, for their handle.
DEFAULT_LIVE_CAPACITY: Final = 200_000
#: A session's last use is written at most this often (it is kept exactly in memory).
TOUCH_EVERY: Final = 60.0
#: How often ended sessions are looked for, and how many are ended per app per look.
SWEEP_EVERY: Final = 60.0
SWEEP_BATCH: Final = 1000
#: Extra candidates read when an app is full (see _make_room).
EVICTION_WINDOW: Final = 64
#: Encoded `session_token` answers kept (about 1 KiB each) for the sessions in use.
PREPARED_FRAMES: Final = 4096
#: The most sessions one listing returns.
MAX_LISTING: Final = 1000
#: A bearer this young is not rotated on a 401 (`renew_rejected`).
RENEW_MIN_AGE: Final = 10.0


@dataclass(frozen=True, slots=True)
class Created:
    """A new session. `handle` is shown this once."""

    handle: Secret
    expires_at: float
    #: When the session ends if unused (idle) or at the latest (Geins' maxAge).
    session_ends_at: float
    remember: bool


@dataclass(frozen=True, slots=True)
class Served:
    token: Secret
    expires_at: float


@dataclass(frozen=True, slots=True)
class Info:
    """The SDK's `authorized()`: who is logged in and until when."""

    username: str
    customer_type: str
    expires_at: float
    session_ends_at: float
    remember: bool


@dataclass(frozen=True, slots=True)
class Listed:
    """One session as an admin sees it: never its handle, only 8 hex digits of its id."""

    session: str
    username: str | None
    created_at: float
    last_used_at: float
    ends_at: float


class CustomerSessions:
    """Customer sessions on demand: what the ops, the proxy and the sweeper call.

    Over the house's ~300 lines, on purpose: every way into a session (login,
    register, token, info, passwd, logout, the admins' listing and ends, the proxy's
    lookup) goes through the same load guard, lifetime rule and rate limits, which
    must be read together; the refresh flights are `Refresher`'s, the store is behind
    `contract.SessionStore`, the values and rules are `model/`'s.
    """

    def __init__(
        self,
        apps: Mapping[str, AppSettings],
        store: SessionStore,
        keyring: Keyring,
        *,
        http: httpx.AsyncClient | None = None,
        clients: Mapping[str, GeinsApi] | None = None,
        wall: WallClock | None = None,
        rng: random.Random | None = None,
        live_capacity: int = DEFAULT_LIVE_CAPACITY,
    ) -> None:
        if clients is None:
            if http is None:
                raise ValueError("give an httpx client or the Geins clients")
            clients = {name: GeinsClient(app.endpoint, http) for name, app in apps.items()}
        self.apps = dict(apps)
        self.store = store
        self._keyring = keyring
        self._clients = clients
        self._wall = wall or SystemClock()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.stats = CustomerStats()
        self.lives = LiveMap(live_capacity, left=self._left)
        self._limiters = {name: LoginLimiter(app.rates) for name, app in apps.items()}
        self._loading: dict[bytes, trio.Event] = {}
        #: Sessions by handle for the hot path (`_held`), as their handles were last
        #: seen. Memory only, like the handle the `Live` holds; an entry is believed
        #: only for its own app and while its `Live` is not ended. Whatever leaves
        #: `lives` leaves this map too (`_left`), so an entry is one `lives` holds (or,
        #: ended, one on its way out). The whole map is dropped
        #: when it outgrows `lives` (stale entries pile up there). Keyed by the handle
        #: alone (not by app and handle): a handle is 256 random bits, and a tuple per
        #: session is 56 bytes of the memory budget.
        self._recent: dict[str, Live] = {}
        #: The encoded `session_token` answers of sessions in use, by session id, with
        #: the generation each was encoded from: a rotation makes a new one. Bounded
        #: (a bearer's worth each): dropped whole when full, rebuilt on the next use.
        self._frames: dict[bytes, tuple[int, PreparedResponse]] = {}
        self._creating: dict[bytes, trio.Lock] = {}
        self.refresher = Refresher(
            self.apps,
            clients,
            store,
            self.lives,
            keyring,
            wall=self._wall,
            rng=self._rng,
            stats=self.stats,
        )
        self.touch_every = TOUCH_EVERY
        self.sweep_every = SWEEP_EVERY
        store.watch(self._dropped)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The store's writer, the refresher and the sweeper, until cancelled. Loads
        nothing and refreshes nothing at start: sessions wake as their handles arrive."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.store.run)  # a fleet's store loads its key first
            for name in self.apps:
                self.stats.sessions[name] = await self.store.count(name)
            await nursery.start(self.refresher.run)
            nursery.start_soon(self._sweep_loop)
            task_status.started()

    async def drain(self) -> None:
        """For a shutdown: start no proactive refresh, wait for the flights under way
        (a rotated refresh token is committed before the daemon exits) and for every
        queued write. The caller bounds the wait."""
        self.refresher.draining = True
        await self.refresher.drained()
        await self.store.flush()

    # -- creating sessions ---------------------------------------------------------------------

    async def login(
        self, app: str, uid: int, username: str, password: Secret, *, remember: bool
    ) -> Created:
        settings = self._app(app)
        self._limit(app, username, uid)
        try:
            grant = await self._clients[app].login(username, password, remember=remember)
        except GeinsError as exc:
            self.stats.logins[app, exc.code] += 1
            raise
        created = await self._create(settings, username, remember, grant)
        self.stats.logins[app, "ok"] += 1
        return created

    async def register(
        self,
        app: str,
        uid: int,
        username: str,
        password: Secret,
        *,
        remember: bool,
        user: Mapping[str, Any] | None = None,
    ) -> Created:
        """Create the customer's account at Geins (`user`: Geins' UserInputType, the
        SDK's default when None) and a session for it."""
        settings = self._app(app)
        self._limit(app, username, uid)
        try:
            grant = await self._clients[app].register(username, password, user)
        except GeinsError as exc:
            self.stats.registrations[app, exc.code] += 1
            raise
        created = await self._create(settings, username, remember, grant)
        self.stats.registrations[app, "ok"] += 1
        return created

    def _limit(self, app: str, username: str, uid: int) -> None:
        wait = self._limiters[app].attempt(username, uid, self._wall.now())
        if wait > 0:
            self.stats.rate_limited[app] += 1
            raise RateLimited(wait)

    async def _create(
        self, settings: AppSettings, username: str, remember: bool, grant: Grant
    ) -> Created:
        app, now = settings.name, self._wall.now()
        try:
            token_set = Tokens.from_grant(grant, now, settings.policy.max_clock_skew)
        except MalformedAnswer:
            self.refresher.purge(app, grant.refresh)
            raise
        handle = new_handle()
        store_key = self.store.store_key
        session_id = store_key.session_id(app, handle)
        customer_id = store_key.customer_id(app, username)
        record = SessionRecord(
            app=app,
            username=username,
            remember=remember,
            bearer=grant.bearer,
            refresh=grant.refresh,
            obtained_at=now,
            expires_at=token_set.expires_at,
            session_ends_at=token_set.session_expires_at,
            created_at=now,
            generation=1,
            committed_at=now,
        )
        live = Live(session_id, handle.reveal(), record, now)
        live.next_refresh_at = rules.rotation_due_at(token_set, settings.policy, self._rng)
        lock = self._creating.setdefault(customer_id, trio.Lock())
        try:
            async with lock:
                await self._make_room(settings, customer_id)
                self.stats.sessions[app] += 1
                try:
                    await self.store.commit(self.refresher.row(live, record), expected=0)
                except StoreError:
                    # Nobody will ever hold a handle to it: log it out at Geins rather
                    # than leave it alive there until its maxAge.
                    self.stats.sessions[app] -= 1
                    self.refresher.purge(app, grant.refresh)
                    raise
                except BaseException:
                    self.stats.sessions[app] -= 1
                    raise
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._creating.pop(customer_id, None)
        self.lives.put(live)
        self._remember(handle, live)
        self.refresher.consider(live, now)
        log.info("customer_session_created", app=app, session=log_id(session_id), remember=remember)
        ends_at = settings.lifetime.ends_at(
            remember=remember, last_used_at=now, session_ends_at=live.session_ends_at
        )
        return Created(handle, live.expires_at, ends_at, remember)

    async def _make_room(self, settings: AppSettings, customer_id: bytes) -> None:
        """End the least recently used sessions over the customer's and the app's limit.

        The store's last-use times lag by up to TOUCH_EVERY, memory's do not: candidates
        are ordered by the later of the two, so a customer's eviction is exact and an
        app's is exact to within TOUCH_EVERY (its candidates are the store's oldest
        `EVICTION_WINDOW` more than needed)."""
        app, lifetime = settings.name, settings.lifetime
        mine = await self.store.customer_uses(app, customer_id)
        excess = over_limit(len(mine), lifetime.max_per_customer)
        for session_id in self._least_recent(mine, excess):
            await self._end_by_id(app, session_id, EndReason.EVICTED)
        excess = over_limit(self.stats.sessions[app], lifetime.max_sessions)
        if excess:
            candidates = await self.store.least_recent(app, excess + EVICTION_WINDOW)
            for session_id in self._least_recent(candidates, excess):
                await self._end_by_id(app, session_id, EndReason.EVICTED)

    def _least_recent(self, candidates: list[tuple[bytes, float]], count: int) -> list[bytes]:
        def last_use(candidate: tuple[bytes, float]) -> float:
            live = self.lives.peek(candidate[0])
            return candidate[1] if live is None else max(candidate[1], live.last_used_at)

        return [session_id for session_id, _ in sorted(candidates, key=last_use)[:count]]

    async def _end_by_id(self, app: str, session_id: bytes, reason: EndReason) -> None:
        self._frames.pop(session_id, None)
        live = self.lives.peek(session_id)
        if live is not None:
            await self.refresher.end(live, reason, purge=True)
        else:
            await self.refresher.forget([session_id], app, reason)

    # -- using sessions ----------------------------------------------------------------------

    async def token(self, app: str, handle: Secret, min_valid: float = 0.0) -> Served:
        """The customer's bearer with at least `min_valid` seconds left: from memory
        when it has them, after the session's one refresh in flight otherwise."""
        live = await self._use(app, handle)
        await self.fresh(live, min_valid)
        return Served(live.bearer, live.expires_at)

    async def use(self, app: str, handle: Secret) -> Live:
        """The session `handle` names in `app`, its use noted (the proxy's long way);
        `UnknownSession` for anything wrong with the handle, as every op answers."""
        return await self._use(app, handle)

    async def fresh(self, live: Live, min_valid: float) -> None:
        """Return once `live`'s bearer has `min_valid` seconds left, after its one
        refresh in flight if it had not. At most two refreshes, each checked: the first
        may adopt a bearer another node got a while ago, which a second one (a rotation
        of its own) then replaces."""
        for attempt in range(3):
            if live.ended:
                raise UnknownSession()
            now = self._wall.now()
            demand = rules.on_demand(live.expires_at, now, min_valid, live.retry_at)
            if demand is rules.Demand.SERVE and not live.unsaved:
                return
            if demand is rules.Demand.BACKING_OFF and not live.unsaved:
                assert live.retry_at is not None
                raise Transient("Geins failed the last refresh; retry later", live.retry_at - now)
            if attempt < 2:
                await self.refresher.refresh(live)
        raise BadRequest(f"min_valid {min_valid:g} s is longer than Geins' bearers last")

    async def renew_rejected(self, live: Live, bearer: str) -> None:
        """Geins refused `bearer` (a 401 to a proxied request) though it has time left:
        rotate the session once, through its single flight. A caller whose bearer was
        replaced meanwhile returns at once, so of many requests refused with one bearer,
        one refresh; a bearer younger than `RENEW_MIN_AGE` is not rotated (a 401 that
        early is about something else, and rotating on each would turn a flood of
        requests into a flood of refreshes)."""
        if live.ended:
            raise UnknownSession()
        if live.bearer.reveal() != bearer or live.unsaved:
            return
        if self._wall.now() - live.obtained_at < RENEW_MIN_AGE:
            return
        await self.refresher.refresh(live)

    def token_frame(
        self, request_id: int, app: str, handle: str, min_valid: float, now: float
    ) -> bytes | None:
        """The hot path of `session_token`, answered without a task: the encoded answer
        with the bearer of a session held in memory that has `min_valid` seconds left,
        its use noted. None sends the request the long way (`token`), which loads,
        refreshes, ends or refuses. `app` must name a configured app the caller may use."""
        live = self._held(app, handle, now)
        if live is None or live.expires_at - now < min_valid:
            return None
        prepared = self._frames.get(live.session_id)
        if prepared is None or prepared[0] != live.generation:
            if len(self._frames) >= PREPARED_FRAMES:
                self._frames.clear()
            fields = {"ok": True, "token": live.bearer.reveal(), "expires_at": live.expires_at}
            prepared = self._frames[live.session_id] = (live.generation, PreparedResponse(fields))
        return prepared[1].frame(request_id)

    def in_memory(self, app: str, handle: str) -> Live | None:
        """`_held` now (the proxy's path)."""
        return self._held(app, handle, self._wall.now())

    def _held(self, app: str, handle: str, now: float) -> Live | None:
        """The session `handle` names in `app`, without awaiting, if it is held in
        memory, within its idle and absolute ends, with a bearer that has time left:
        its use noted. None sends the caller the long way (`use`), which loads,
        refreshes, ends or refuses. `app` must name a configured app the caller may use.

        Found through `_recent`, not the session id: the id's HMAC would cost more than
        the rest of the answer. A handle not there (unknown, another app's, not seen
        since it was last dropped) goes the long way, which is the one path that
        refuses, so a refusal takes the same time whichever way it came."""
        live = self._recent.get(handle)
        if live is None or live.app != app or live.unsaved or live.ended or live.expires_at <= now:
            return None
        # lifetime.ended's rule, written out (no calls on this path): over at the
        # absolute end, or idle since the last use (one in the future counts as now).
        # Over goes the long way, which ends it.
        ends_at, last = live.session_ends_at, live.last_used_at
        lifetime = self.apps[app].lifetime
        idle = lifetime.idle_remembered if live.remember else lifetime.idle_short
        if (ends_at is not None and now >= ends_at) or now >= (last if last < now else now) + idle:
            return None
        if now > last:
            live.last_used_at = now
        if now - live.saved_use_at >= self.touch_every or not live.scheduled:
            self._used(live, now)  # the store's coarse last use, the refresh schedule
        return live

    async def info(self, app: str, handle: Secret) -> Info:
        live = await self._use(app, handle)
        lifetime = self.apps[app].lifetime
        return Info(
            username=live.username,
            customer_type=claims.decode(live.bearer.reveal()).customer_type,
            expires_at=live.expires_at,
            session_ends_at=lifetime.ends_at(
                remember=live.remember,
                last_used_at=live.last_used_at,
                session_ends_at=live.session_ends_at,
            ),
            remember=live.remember,
        )

    async def passwd(
        self, app: str, uid: int, handle: Secret, password: Secret, new_password: Secret
    ) -> float:
        """Change the customer's password at Geins; the session carries on with the
        tokens Geins answers with (Geins ends the customer's other sessions). Returns
        the new bearer's expiry."""
        live = await self._use(app, handle)
        self._limit(app, live.username, uid)
        client = self._clients[app]

        async def change(current: Live) -> Grant:
            return await client.change_password(
                current.refresh, current.username, password, new_password
            )

        await self.refresher.refresh(live, change)
        return live.expires_at

    async def logout(self, app: str, handle: Secret) -> None:
        """Log out at Geins (whatever it answers), then forget the session."""
        live = await self._live(app, handle)
        live.ended = True
        self.lives.pop(live.session_id)
        self._frames.pop(live.session_id, None)
        with self.lives.ending([live.session_id]):
            if live.flight is not None:
                await live.flight.done.wait()
            try:
                await self._clients[app].logout(live.refresh)
            except GeinsError as exc:
                log.info("customer_logout_failed", app=app, reason=str(exc))
            await self.refresher.forget([live.session_id], app, EndReason.LOGOUT)

    async def _use(self, app: str, handle: Secret) -> Live:
        live = await self._live(app, handle)
        now = self._wall.now()
        reason = self.apps[app].lifetime.ended(
            remember=live.remember,
            last_used_at=live.last_used_at,
            session_ends_at=live.session_ends_at,
            now=now,
        )
        if reason is not None:
            await self.refresher.end(live, reason, purge=True)
            raise UnknownSession()
        self._used(live, now)
        return live

    def _used(self, live: Live, now: float) -> None:
        """Note a use: exactly in memory, coarsely in the store and in the LRU order of
        `lives` (once per `touch_every` on the hot path); a session in use is refreshed
        ahead of expiry."""
        live.last_used_at = max(live.last_used_at, now)
        if now - live.saved_use_at >= self.touch_every:
            live.saved_use_at = now
            self.store.touch(live.app, live.session_id, now)
            self.lives.touch(live)
        self.refresher.consider(live, now)

    async def _live(self, app: str, handle: Secret) -> Live:
        """The session `handle` names in `app`, from memory or from the store."""
        self._app(app)
        if not well_formed(handle.reveal()):
            raise UnknownSession()
        session_id = self.store.store_key.session_id(app, handle)
        while True:
            live = self.lives.get(session_id)
            if live is not None:
                self._remember(handle, live)
                return live
            loading = self._loading.get(session_id)
            if loading is None:
                break
            await loading.wait()
        self._loading[session_id] = done = trio.Event()
        self.lives.load_started(session_id)
        loaded = None
        try:
            loaded = await self._load(app, handle, session_id)
        finally:
            kept = self.lives.load_done(session_id, loaded)
            del self._loading[session_id]
            done.set()
        if loaded is None or not kept:  # it ended while its row was being read
            raise UnknownSession()
        self._remember(handle, loaded)
        return loaded

    def _remember(self, handle: Secret, live: Live) -> None:
        if len(self._recent) >= 2 * self.lives.capacity:
            self._recent.clear()
        self._recent[handle.reveal()] = live

    async def _load(self, app: str, handle: Secret, session_id: bytes) -> Live:
        row = await self.store.get(app, session_id)
        if row is None or row.app != app:
            raise UnknownSession()
        key = session_key(app, handle)
        try:
            record, _ = records.open_record(row.record, self._keyring, app, session_id, key)
        except RecordUnreadable as exc:
            log.warning(
                "customer_session_unreadable", app=app, session=log_id(session_id), reason=str(exc)
            )
            raise UnknownSession() from None
        if row.generation is not None and row.generation != record.generation:
            # A sealed record filed under another generation: a replay (contract.py).
            log.warning(
                "customer_record_refused",
                app=app,
                session=log_id(session_id),
                reason="filed under a generation other than its sealed one",
            )
            raise UnknownSession()
        return Live(session_id, handle.reveal(), record, row.last_used_at)

    def _dropped(self, app: str, session_id: bytes) -> None:
        """Another node ended this session (the store says so): forget it here, so
        that its next use finds it gone. A false report costs a reload from the store."""
        self._frames.pop(session_id, None)
        live = self.lives.peek(session_id)
        if live is not None and live.app == app and live.flight is None:
            self.lives.pop(session_id)

    def _left(self, live: Live) -> None:
        """`live` left `lives` (dropped for room, ended, or ended by another node): it
        leaves `_recent` too, so the hot path never serves a session `lives` lacks."""
        if self._recent.get(live.handle) is live:
            del self._recent[live.handle]

    # -- administering ---------------------------------------------------------------------

    async def sessions(self, app: str, username: str | None = None) -> list[Listed]:
        """An app's sessions (at most MAX_LISTING, most recently used first), or one
        customer's."""
        lifetime = self._app(app).lifetime
        if username is None:
            rows = await self.store.listing(app, MAX_LISTING)
        else:
            customer_id = self.store.store_key.customer_id(app, username)
            rows = (await self.store.customer_sessions(app, customer_id))[::-1][:MAX_LISTING]
        listed = []
        for row in rows:
            live = self.lives.peek(row.session_id)
            used = max(row.last_used_at, live.last_used_at if live is not None else 0.0)
            ends_at = lifetime.ends_at(
                remember=row.remember, last_used_at=used, session_ends_at=row.ends_at
            )
            name = records.open_name(self._keyring, app, row.session_id, row.name)
            listed.append(Listed(log_id(row.session_id), name, row.created_at, used, ends_at))
        return listed

    async def end_customer(self, app: str, username: str) -> int:
        """Log a customer out everywhere: every session of theirs in this app ends (and
        is logged out at Geins when this daemon holds its tokens). Returns how many."""
        self._app(app)
        customer_id = self.store.store_key.customer_id(app, username)
        rows = await self.store.customer_sessions(app, customer_id)
        for row in rows:
            await self._end_by_id(app, row.session_id, EndReason.REVOKED)
        return len(rows)

    # -- purging ---------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self.sweep_every)
            try:
                await self.sweep()
            except StoreError as exc:  # the store's failure, never the daemon's end
                log.warning("customer_sweep_failed", reason=str(exc))

    async def sweep(self) -> int:
        """End the sessions past their idle or absolute end. Returns how many ended."""
        ended = 0
        now = self._wall.now()
        for app, settings in self.apps.items():
            # Other nodes (fleet mode) create and end sessions too.
            self.stats.sessions[app] = await self.store.count(app)
            lifetime = settings.lifetime
            rows = await self.store.ended(
                app, now, lifetime.idle_short, lifetime.idle_remembered, SWEEP_BATCH
            )
            by_reason: dict[EndReason, list[bytes]] = {}
            for row in rows:
                live = self.lives.peek(row.session_id)
                used = (
                    row.last_used_at if live is None else max(row.last_used_at, live.last_used_at)
                )
                reason = lifetime.ended(
                    remember=row.remember, last_used_at=used, session_ends_at=row.ends_at, now=now
                )
                if reason is None:  # used since its last use was written
                    self.store.touch(app, row.session_id, used)
                elif live is not None:
                    await self.refresher.end(live, reason, purge=True)
                    ended += 1
                else:
                    by_reason.setdefault(reason, []).append(row.session_id)
            for reason, session_ids in by_reason.items():
                await self.refresher.forget(session_ids, app, reason)
                ended += len(session_ids)
        return ended

    def _app(self, app: str) -> AppSettings:
        settings = self.apps.get(app)
        if settings is None:
            raise UnknownApp(f"no app {app!r} is configured")
        return settings

    def status(self) -> dict[str, Any]:
        """Per-app counts for `status` (no handle, no id, no username)."""
        return {
            app: {
                "sessions": self.stats.sessions[app],
                "in_memory": self.lives.count(app),
            }
            for app in self.apps
        }
