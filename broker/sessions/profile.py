"""One profile's I/O shell: drives its pure `Session` with Geins, the disk and the clocks.

Everything that changes the profile's tokens (a scheduled step, login, logout,
refresh, password change, register) holds `_upstream`, so exactly one exchange with
Geins is in flight per profile: the refresh token rotates, and two refreshes racing
with the same token would void each other. Those exchanges run shielded from
cancellation (bounded by the request timeout): a client that hangs up, or a SIGTERM,
never leaves a rotation half-done with the new refresh token lost.

The new refresh token is on disk before the new bearer is served. Token requests that
the held bearer satisfies are answered without awaiting anything (`token_frame`, the
prepared answer of frame.py). The account operations are accounts.py's, the writes to
disk and their retries persist.py's; this module runs them under the single flight.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import httpx
import trio

from broker.core.clock import WallClock
from broker.core.errors import (
    BadRequest,
    BrokerFault,
    Busy,
    FleetUnavailable,
    GeinsError,
    RefreshTokenRejected,
    Relayed,
    Timeout,
    UnknownProfile,
    UnusableGrant,
    UpstreamTimeout,
)
from broker.core.secret import Secret
from broker.core.stats import Counts, DaemonStats
from broker.daemon.config_profiles import ProfileConfig
from broker.fleet.link import LOCAL, Link
from broker.observe.log import events
from broker.policy.session import EndSession, Refresh, Session, SleepUntil, Tokens
from broker.sessions.accounts import Accounts, no_session_error, sealed_error
from broker.sessions.frame import TokenFrame, token_fields
from broker.sessions.geins_client import GeinsClient
from broker.sessions.persist import Offload, PendingWrite, record_of, saved_of
from broker.sessions.scheduler import Scheduler
from broker.storage.store import Record, Store
from geins_broker_client.protocol import Code

#: Offload is persist.py's, named here too: the daemon passes one in.
__all__ = ["Offload", "Profile", "WatchEvent"]

log = events("broker.profile")

#: Extra time a shielded exchange may take beyond its requests' own timeouts (disk).
_SAVE_ALLOWANCE: Final = 10.0
#: A bearer Geins refuses is rotated only if it is at least this old (renew_rejected).
_RENEW_MIN_AGE: Final = 10.0

WatchEvent = dict[str, Any]
#: What the fleet shows when a session it adopted needs a login.
_FLEET_REFUSED: Final = "Geins refused the fleet's refresh token; log in again"


class Profile:
    """One profile's refresh loop and its single flight, and the seam to the rest.

    The other concerns live in their own classes: the prepared answer (`TokenFrame`),
    the account operations (`Accounts`) and the writes to disk (`PendingWrite`).
    It holds about twenty attributes, over the house's ~15: the single flight is one
    concern made of several small pieces (the lock, the event of the next attempt,
    the renewal of a refused bearer, the last failure to report), and the rest are
    the injected drivers (clocks, limiter, scheduler, HTTP client) and the parts other
    packages read (`token_frame`, the result counts). At about 480 lines it is also
    over ~300, for the same reason: the refresh exchange, a `token` caller's wait
    and the renewal of a refused bearer all turn on that lock, that event and that
    failure, and read as one single flight only side by side.
    """

    def __init__(
        self,
        config: ProfileConfig,
        *,
        http: httpx.AsyncClient,
        store: Store,
        wall: WallClock,
        limiter: trio.CapacityLimiter,
        rng: random.Random | None = None,
        token_wait: float = 15.0,
        on_change: Callable[[Profile], None] | None = None,
        offload: Offload = trio.to_thread.run_sync,
        scheduler: Scheduler | None = None,
        stats: DaemonStats | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.session = Session(config.name, config.policy, rng)
        self.stats = stats or DaemonStats()
        self.geins = GeinsClient(
            config.endpoint, http, config.request_timeout, stats=self.stats.upstream
        )
        self.token_wait = token_wait
        self._http = http
        self._wall = wall
        self._limiter = limiter
        self._on_change = on_change
        self._scheduler = scheduler
        self.retired = False
        #: Fleet mode's seam (fleet/link.py); LOCAL for a profile this host has alone.
        self.fleet: Link = LOCAL
        # Made on first use: ten thousand idle profiles should not each carry a lock
        # and two events that nobody waits on.
        self._upstream_lock: trio.Lock | None = None
        #: Set after the next refresh attempt, for `token` callers waiting on it.
        self._attempt: trio.Event | None = None
        #: Set after the next change a watcher may care about.
        self._changed: trio.Event | None = None
        self._last_failure: BrokerFault | None = None
        self.frame = TokenFrame(config.name, self.session)
        #: The hot path, bound once: a `token` request costs the frame's own call and
        #: nothing more. (The C hot path, broker/rpc/_fastpath.c, reads `frame` itself:
        #: this must stay the frame's `answer`.)
        self.token_frame: Callable[[int, float, float], bytes | None] = self.frame.answer
        self.writes = PendingWrite(
            config.name, self.session, store, offload, on_change=self.publish, on_retry=self.plan
        )
        self.accounts = Accounts(config.name, self.session, self.writes, wall, self)
        # What the metrics collector reads (broker/core/stats.py): `token` answers straight
        # from memory (`tokens_from_memory`), every other `token` outcome by result, and
        # refresh attempts by result.
        self.token_results = Counts("result")
        self.refresh_results = Counts("result")
        #: Set when the renewal of a bearer Geins refused is over (`renew_rejected`).
        self._renewal: trio.Event | None = None

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, {self.session.state})"

    @property
    def tokens_from_memory(self) -> int:
        """`token` answers served by the prepared frame (the hot path's count)."""
        return self.frame.served

    # -- configuration and restart ---------------------------------------------------------

    def reconfigure(self, config: ProfileConfig, token_wait: float | None = None) -> None:
        """New settings from a reloaded config; the session itself is kept."""
        self.config = config
        self.session.policy_changed(config.policy)
        self.geins = GeinsClient(
            config.endpoint, self._http, config.request_timeout, stats=self.stats.upstream
        )
        if token_wait is not None:
            self.token_wait = token_wait

    def restore(self, record: Record, spread: float) -> None:
        """The session saved on disk, as it was before a restart; overdue refreshes are
        spread over `spread` seconds."""
        self.session.restored(saved_of(self.name, record))
        self.session.defer_startup_refresh(self._wall.now(), spread)

    def adopt(self, record: Record | None) -> None:
        """Fleet mode: a session another node committed (a rotation, a login; None: a
        logout) replaces ours. Served at once, written to disk by the next step."""
        if record is None:
            self.session.logged_out()
        else:
            saved = saved_of(self.name, record)
            self.session.adopted(saved, self._wall.now(), _FLEET_REFUSED)
        self._last_failure = None
        self.writes.owe()
        self.publish()
        self.plan()

    def mark_sealed(self, reason: str) -> None:
        """The saved session does not open (its key is missing): serve nothing, change
        nothing, until `unseal`."""
        self.session.found_sealed(reason)
        self.publish()

    def unseal(self, record: Record | None, spread: float) -> None:
        """The key is back: carry on with the saved session."""
        self.session.unsealed()
        if record is not None:
            self.restore(record, spread)
        self.publish()
        self.plan()

    def _refuse_if_sealed(self) -> None:
        if self.session.sealed is not None:
            raise sealed_error(self.name, self.session)

    # -- scheduled steps ---------------------------------------------------------------------

    @property
    def _upstream(self) -> trio.Lock:
        """Held for every exchange that changes the tokens (and every write to disk)."""
        if self._upstream_lock is None:
            self._upstream_lock = trio.Lock()
        return self._upstream_lock

    async def step(self) -> None:
        """Do what is due now (refresh, end the session, retry a write), then plan the
        next step. The scheduler calls this; at most one runs per profile."""
        action = self.session.next_action(self._wall.now())
        if isinstance(action, Refresh):
            await self._refresh()
        elif isinstance(action, EndSession):
            await self._end_session()
        if self.writes.due():
            await self.flush()
        self.plan()

    def retire(self) -> None:
        """Removed from the configuration: no more steps (one under way finishes), and
        watchers are told. The daemon keeps the object, in case the profile returns."""
        self.retired = True
        if self._scheduler is not None:
            self._scheduler.forget(self)
        self.publish()

    def reinstate(self, config: ProfileConfig) -> None:
        """Back in the configuration: the same object, so the same lock and session."""
        self.retired = False
        self.reconfigure(config)
        self.plan()

    def plan(self) -> None:
        """Tell the scheduler when this profile next has something to do."""
        if self._scheduler is None or self.retired:
            return
        now = self._wall.now()
        action = self.session.next_action(now)
        when = float("inf")
        if isinstance(action, Refresh | EndSession):
            when = now
        elif isinstance(action, SleepUntil):
            when = action.when
        when = min(when, now + self.writes.retry_in())
        if when == float("inf"):
            self._scheduler.forget(self)
        else:
            self._scheduler.at(self, when)

    async def _refresh(self) -> None:
        async with self._upstream:
            session = self.session
            if not isinstance(session.next_action(self._wall.now()), Refresh):
                return  # someone refreshed (or logged out) while we waited for the lock
            started = None
            try:
                # Fleet mode: the lease, and maybe another node's newer session instead.
                async with self.fleet.rotation() as go:
                    refresh_token = session.tokens.refresh if session.tokens else None
                    if not go or refresh_token is None:
                        return
                    async with self._limiter, self._shielded(1):
                        started = trio.current_time()  # not counting the wait for the limiter
                        result = await self._refresh_with(refresh_token)
            except (UpstreamTimeout, FleetUnavailable) as exc:
                self._fail(exc)
                result = exc.code
            finally:
                self._wake_waiters()
            self.refresh_results.inc(result)
            if started is not None:
                self.stats.refresh_duration.observe(trio.current_time() - started)

    async def _refresh_with(self, refresh_token: Secret) -> str:
        """One refresh exchange; its result for the metrics: "ok", "rejected" or the
        failure's error code."""
        session = self.session
        try:
            grant = await self.geins.refresh(refresh_token)
        except RefreshTokenRejected as exc:
            return await self._rejected(exc)
        except UnusableGrant as exc:
            await self.keep_rotated(exc.refresh)
            self._fail(exc)
            return exc.code
        except GeinsError as exc:
            self._fail(exc)
            return exc.code
        now = self._wall.now()
        try:
            tokens = Tokens.from_grant(grant, now, session.policy.max_clock_skew)
        except GeinsError as exc:
            await self.keep_rotated(grant.refresh)
            self._fail(exc)
            return exc.code
        record = record_of(session, tokens, refreshed_at=now)
        await self.writes.save(record)
        if not await self.fleet.commit(record):
            return "superseded"  # our lease had lapsed and another node committed first
        session.refreshed(tokens, now)
        log.info(
            "refreshed",
            profile=self.name,
            expires_in=round(tokens.expires_at - now),
            next_in=round((session.next_refresh_at or now) - now),
        )
        self.publish()
        return "ok"

    async def _rejected(self, exc: RefreshTokenRejected) -> str:
        """Geins refused the refresh token: a login is needed, unless another node of the
        fleet had rotated it (then its newer session is adopted)."""
        if await self.fleet.rejected():
            return "stale"
        session = self.session
        self._last_failure = exc
        session.refresh_rejected(str(exc))
        log.warning("refresh_rejected", profile=self.name, state=session.state)
        await self.writes.save(record_of(session))
        await self.fleet.commit(record_of(session))
        self.publish()
        return "rejected"

    async def keep_rotated(self, refresh_token: Secret) -> None:
        """Geins rotated the refresh token but sent an unusable bearer (or none): the
        old refresh token is spent, so keep the new one (on disk first) with the
        bearer still held, and let the caller count a failure and retry later."""
        session = self.session
        if session.tokens is None:
            return
        session.refresh_token_replaced(refresh_token)
        await self.writes.save(record_of(session))
        await self.fleet.commit(record_of(session))

    def _fail(self, exc: GeinsError) -> None:
        self._last_failure = exc
        retry_after = getattr(exc, "retry_after", None)
        delay = self.session.refresh_failed(str(exc), self._wall.now(), retry_after)
        log.warning(
            "refresh_failed",
            profile=self.name,
            code=exc.code,
            reason=str(exc),
            failures=self.session.failures,
            retry_in=round(delay, 3),
            token_left=round(self.session.valid_for(self._wall.now())),
        )
        self.publish()

    async def _end_session(self) -> None:
        async with self._upstream:
            if isinstance(self.session.next_action(self._wall.now()), EndSession):
                self.session.session_ended()
                log.warning("session_expired", profile=self.name)
                await self.writes.save(record_of(self.session))
                self.publish()

    @asynccontextmanager
    async def _shielded(self, requests: int) -> Any:
        """Finish what was started with Geins even if the caller goes away, within the
        time `requests` requests may take, plus the write to disk."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = (
                trio.current_time() + requests * self.config.request_timeout + _SAVE_ALLOWANCE
            )
            yield
        if scope.cancelled_caught:
            raise UpstreamTimeout("the exchange with Geins took too long")

    # -- answering token requests ----------------------------------------------------------

    def token_fields(self, tokens: Tokens) -> dict[str, Any]:
        """What a `token` answer (and a watch's token event) says."""
        return token_fields(self.name, tokens)

    async def ensure_token(self, min_valid: float, *, reader: bool = False) -> None:
        """Wait until the bearer has `min_valid` seconds left, refreshing once if needed.

        Never waits longer than `token_wait`, and causes at most one refresh: a failed
        one is reported at once rather than retried here, and one that still leaves
        less than `min_valid` (a fresh token has exactly its lifetime, minus the time
        its answer took) is a `bad_request`, never a loop. An expired token is never
        the answer. A `reader` is held to the policy's reader_refresh_interval.
        """
        session = self.session
        deadline = trio.current_time() + self.token_wait
        attempts = session.attempts
        while True:
            now = self._wall.now()
            if session.serves(now, min_valid):
                return
            tokens = session.tokens
            if tokens is None or session.login_required:
                raise self._no_session()
            if min_valid >= tokens.lifetime:
                raise BadRequest(
                    f"min_valid {min_valid:g} s is not less than the token lifetime "
                    f"of {tokens.lifetime:.0f} s"
                )
            if session.attempts != attempts:  # this request has had its refresh
                if session.failures:
                    raise self._failure()
                raise BadRequest(
                    f"min_valid {min_valid:g} s is more than even a fresh token has "
                    f"({session.valid_for(now):.3f} s left of {tokens.lifetime:.0f} s); "
                    "ask for less"
                )
            due = session.demand_refresh(now, reader=reader)
            if due - now > deadline - trio.current_time():
                if session.failures:
                    raise self._failure()
                raise Busy(
                    f"profile {self.name!r} was refreshed for a reader less than "
                    f"{session.policy.reader_refresh_interval:g} s ago; try again in "
                    f"{due - now:.0f} s"
                )
            if self._attempt is None:
                self._attempt = trio.Event()
            attempt = self._attempt
            self.plan()
            with trio.move_on_at(deadline):
                await attempt.wait()
            if not attempt.is_set():
                raise Timeout(f"no fresh token for {self.name!r} within {self.token_wait:g} s")

    def _failure(self) -> BrokerFault:
        failure = self._last_failure
        if failure is None:
            return Relayed(Code.UPSTREAM_UNAVAILABLE, self.session.last_error or "refresh failing")
        return Relayed(failure.code, str(failure))

    # -- operations from the daemon's own user -----------------------------------------------

    async def login(self, username: str, password: Secret, remember: bool) -> None:
        self._refuse_if_sealed()
        async with self._upstream, self._shielded(4):
            await self.accounts.login(username, password, remember)

    async def register(
        self, username: str, password: Secret, remember: bool, user: Mapping[str, Any] | None
    ) -> None:
        self._refuse_if_sealed()
        async with self._upstream, self._shielded(5):
            await self.accounts.register(username, password, remember, user)

    async def change_password(self, password: Secret, new_password: Secret) -> None:
        async with self._upstream, self._shielded(3):
            await self.accounts.change_password(password, new_password)

    async def logout(self) -> None:
        self._refuse_if_sealed()
        async with self._upstream:
            await self.accounts.logout()

    async def refresh_now(self) -> None:
        """Rotate now (an operator asked), even while backing off."""
        session = self.session
        if not session.can_refresh or session.login_required:
            raise self._no_session()
        before = session.refreshes
        session.refresh_due(self._wall.now())
        await self._refresh()
        if session.refreshes == before:
            raise self._no_session() if session.login_required else self._failure()

    async def renew_rejected(self, bearer: str, *, reader: bool = False) -> None:
        """Geins refused `bearer` (a 401) though it has time left by our clock: rotate once.

        Single flight per refused bearer: the first caller rotates and the others wait
        for it; a caller whose bearer was replaced meanwhile returns at once. A failure
        is the session's (backoff, login required); the caller learns of it from its
        next `ensure_token`.

        A bearer younger than `_RENEW_MIN_AGE` is not rotated again: a 401 for a token
        that fresh is about something else (a wrong API key), and rotating on every such
        answer would turn a flood of requests into a flood of refreshes. A `reader` (the
        proxy's caller, not root nor the daemon's user) is held to the policy's
        reader_refresh_interval, as its `token` requests are: any request path it
        chooses may earn a 401 that has nothing to do with the bearer."""
        session = self.session
        tokens = session.tokens
        if tokens is None or tokens.bearer.reveal() != bearer or not session.can_refresh:
            return
        if self._wall.now() - tokens.obtained_at < _RENEW_MIN_AGE:
            return
        if self._renewal is not None:
            await self._renewal.wait()
            return
        now = self._wall.now()
        if reader and session.demand_refresh(now, reader=True) > now:
            return  # a reader's refresh came too recently: the 401 goes to the caller
        renewal = self._renewal = trio.Event()
        try:
            session.refresh_due(self._wall.now())
            await self._refresh()
        finally:
            self._renewal = None
            renewal.set()

    def _no_session(self) -> BrokerFault:
        return no_session_error(self.name, self.session)

    # -- persistence -----------------------------------------------------------------------

    async def flush(self) -> None:
        """One more try at a write that failed (also before shutting down)."""
        async with self._upstream:
            await self.writes.flush()

    # -- what clients see --------------------------------------------------------------------

    def _wake_waiters(self) -> None:
        """`token` callers waiting on a refresh look again (it ended, or the session did)."""
        if self._attempt is not None:
            self._attempt.set()
            self._attempt = None

    def publish(self) -> None:
        """Waiters look again, watchers are told, the daemon hears of the change."""
        self._wake_waiters()
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        if self._on_change is not None:
            self._on_change(self)

    def status(self) -> dict[str, Any]:
        session = self.session
        tokens = session.tokens
        last_error = session.sealed or session.store_error or session.last_error
        return {
            "profile": self.name,
            "state": str(session.state),
            "username": session.username,
            "expires_at": tokens.expires_at if tokens else None,
            "next_refresh_at": session.next_refresh_at if session.can_refresh else None,
            "last_refresh_at": session.last_refresh_at,
            "refreshes": session.refreshes,
            "failures": session.failures,
            "last_error": last_error,
            **({"fleet": fleet} if (fleet := self.fleet.status()) is not None else {}),
        }

    def user(self) -> dict[str, Any]:
        return self.accounts.user()

    async def watch(self, emit: Callable[[WatchEvent], Awaitable[None]]) -> None:
        """Emit the current token, then every rotation and session end, until cancelled."""
        last: object = None
        while True:
            if self.retired:
                raise UnknownProfile(f"profile {self.name!r} was removed from the configuration")
            if self._changed is None:
                self._changed = trio.Event()
            changed = self._changed
            event, key = self._watch_event()
            if key != last:
                await emit(event)
                last = key
            await changed.wait()

    def _watch_event(self) -> tuple[WatchEvent, object]:
        session = self.session
        if session.login_required:
            return {"event": "login_required"}, "login_required"
        tokens = session.tokens
        if tokens is None:
            return {"event": "logged_out"}, "logged_out"
        return {"event": "token", **self.token_fields(tokens)}, tokens.bearer
