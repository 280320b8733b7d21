"""One profile's session state and rotation policy, with no I/O.

Given the tokens Geins handed out, the wall-clock time and the failures so far, a
`Session` says what state the profile is in, whether a token may be served, and what to
do next and when: refresh now, sleep until a moment, or wait to be woken. The daemon's
profile runner (profile.py) carries those decisions out; tests drive this class
directly with plain numbers.

Times are wall-clock Unix seconds, as in the JWT's `exp`. Lifetimes come from each
answer (the JWT's exp and iat, and maxAge), never from constants.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from broker.core.errors import MalformedAnswer
from broker.core.secret import Secret
from broker.geins import claims
from broker.geins.protocol import Grant

#: The jittered rotation point stays inside this share of the lifetime.
_EARLIEST, _LATEST = 0.05, 0.95
_INF: Final = float("inf")
#: The clock-skew rule: a bearer's `iat` may be at most this far from the wall clock.
#: The lifetime is counted from this machine's clock (exp - iat from the receipt), so
#: skew does not matter to rotation; a day covers a host set to local time instead of
#: UTC (at most 14 h) and refuses times that are no clock's at all (exp in 1970).
MAX_CLOCK_SKEW: Final = 86400.0
#: How far past its JWT's `exp` (on this host's clock) a bearer read back from a record
#: may be served: the clock skew between hosts and Geins that a restored or adopted
#: bearer tolerates without being cut short. Fleet nodes' clocks may disagree.
EXP_ALLOWANCE: Final = 300.0
#: The longest bearer lifetime believed (the SDK's "remember me" is 30 days).
MAX_LIFETIME: Final = 366 * 86400
#: 9999-12-31T23:59:59Z: no later time is a time (datetime cannot hold one).
_LAST_TIME: Final = 253_402_300_799


class State(StrEnum):
    LOGGED_OUT = "logged_out"
    #: Tokens are fresh and the last refresh (and write to disk) worked.
    ACTIVE = "active"
    #: Refreshing or saving fails for now; the bearer is served while it lasts.
    DEGRADED = "degraded"
    #: Geins rejected the refresh token, or the session ran out: only a login helps.
    LOGIN_REQUIRED = "login_required"
    #: The saved session is sealed with a key the daemon lacks: bring the key, reload.
    SEALED = "sealed"


@dataclass(frozen=True, slots=True)
class Policy:
    #: Rotate when this share of the bearer's lifetime has passed...
    refresh_at: float = 0.75
    #: ...give or take this share of the lifetime, at random, so profiles spread out.
    jitter: float = 0.05
    #: Retry delays: full jitter over [0, min(cap, base * 2**(failures-1))].
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    #: A reader's `token` may cause a refresh at most this often (admins: any time).
    reader_refresh_interval: float = 30.0
    #: How far a new bearer's `iat` may be from the wall clock (see Tokens.from_grant).
    max_clock_skew: float = MAX_CLOCK_SKEW


@dataclass(frozen=True, slots=True)
class Tokens:
    bearer: Secret
    #: None once Geins rejected it: the bearer may still be served until it expires.
    refresh: Secret | None
    claims: claims.Claims
    obtained_at: float
    expires_at: float
    #: When the refresh token (the session) runs out, from maxAge; None if not stated.
    session_expires_at: float | None

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    def within_exp(self, allowance: float = EXP_ALLOWANCE) -> Tokens:
        """These tokens with `expires_at` no later than the bearer's own `exp`, read on
        this host's clock, plus `allowance` for a host whose clock runs ahead of Geins'.

        For tokens read back from a record (a file, a fleet store) rather than just
        received: their times are the record's word, and a record can be old and
        rebased to look fresh (a replay), so the JWT's `exp`, which Geins signed, bounds
        them. Fresh grants count their lifetime from receipt as before.
        """
        end = self.claims.exp + allowance
        if self.expires_at <= end:
            return self
        return replace(self, obtained_at=min(self.obtained_at, end), expires_at=end)

    @classmethod
    def from_grant(cls, grant: Grant, now: float, max_skew: float = MAX_CLOCK_SKEW) -> Tokens:
        """Tokens as received at wall time `now`.

        With an `iat` claim the lifetime is exp - iat, counted from now, so a small skew
        between this machine's clock and Geins' does not shorten or stretch it. A large
        one is refused (the clock-skew rule): an `iat` more than `max_skew` seconds from
        `now` means one of the two clocks is wrong, and a token whose times cannot be
        trusted is not served. Absurd times (negative, past year 9999, a lifetime over
        `MAX_LIFETIME`) are refused too. Each refusal is a `MalformedAnswer`: the caller
        keeps the session it had.
        """
        try:
            decoded = claims.decode(grant.bearer.reveal())
        except claims.NotAJwt as exc:
            raise MalformedAnswer(f"Geins sent a bearer token that is not a JWT: {exc}") from None
        for name, value in (("exp", decoded.exp), ("iat", decoded.iat)):
            if value is not None and not 0 <= value <= _LAST_TIME:
                raise MalformedAnswer(f"Geins sent a bearer token whose {name} is not a time")
        if decoded.iat is not None and abs(decoded.iat - now) > max_skew:
            raise MalformedAnswer(
                f"Geins sent a bearer token issued {decoded.iat - now:+.0f} s from this "
                f"machine's clock (at most {max_skew:g} s of skew is accepted; check the clock)"
            )
        lifetime = decoded.exp - (decoded.iat if decoded.iat is not None else now)
        if lifetime <= 0 or decoded.expired:
            raise MalformedAnswer("Geins sent a bearer token that has already expired")
        if lifetime > MAX_LIFETIME:
            raise MalformedAnswer(
                f"Geins sent a bearer token valid for {lifetime:.0f} s "
                f"(at most {MAX_LIFETIME} s is believed)"
            )
        session_end = None if grant.max_age is None else now + grant.max_age
        return cls(grant.bearer, grant.refresh, decoded, now, now + lifetime, session_end)


@dataclass(frozen=True, slots=True)
class Refresh:
    """Refresh now."""


@dataclass(frozen=True, slots=True)
class SleepUntil:
    """Nothing to do before `when` (wall time); look again then, or when woken."""

    when: float


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do until something happens (a login, a demand for a token)."""


@dataclass(frozen=True, slots=True)
class EndSession:
    """The refresh token's lifetime is over: the session needs a login."""


Action = Refresh | SleepUntil | Wait | EndSession


@dataclass(frozen=True, slots=True)
class Saved:
    """A session as saved on disk (or committed by another node of the fleet)."""

    tokens: Tokens | None
    username: str | None
    remember: bool
    login_required: bool
    last_refresh_at: float | None
    refreshes: int


REFRESH: Final = Refresh()
WAIT: Final = Wait()
END_SESSION: Final = EndSession()


class Session:
    """One profile's session: a state machine that owns its state.

    As h11's ConnectionState does, it changes only through its own transitions (the
    past-tense methods below, each named for what happened); each bumps `revision`
    itself when the served token or the state changes, so a cache keyed on `revision`
    (the prepared token frame) can never serve what a transition replaced. The fields
    are private attributes behind read-only properties rather than one frozen value
    replaced per transition: readers (status, metrics, the refresh loop) see one
    lookup, not two, and a transition changes two fields, not a copy of all sixteen.
    `revision`, which the token hot path reads on every request, is a slot that
    `__setattr__` guards instead of a property (see there). Assigning any field from
    outside raises AttributeError, and mypy reports it.

    Schedule-only moves (`demand_refresh`, `defer_startup_refresh`, `refresh_due`) and
    a new `policy` do not bump `revision`: neither the token nor the state changes.

    Over the house's ~300 lines and ~15 attributes, on purpose: it is one state machine,
    and what decides a transition (the tokens, the failures, the schedule, the store's
    and the seal's state) must be read together, as h11's ConnectionState reads its
    two roles. Split, every transition would cross objects that could disagree.
    """

    __slots__ = (
        "_attempts",
        "_failures",
        "_last_error",
        "_last_refresh_at",
        "_login_required",
        "_next_refresh_at",
        "_policy",
        "_profile",
        "_reader_demand_at",
        "_refreshes",
        "_remember",
        "_rng",
        "_sealed",
        "_store_error",
        "_tokens",
        "_username",
        "revision",
    )

    def __init__(
        self, profile: str, policy: Policy | None = None, rng: random.Random | None = None
    ) -> None:
        self._profile = profile
        self._policy = policy or Policy()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._username: str | None = None
        self._remember = False
        self._tokens: Tokens | None = None
        self._login_required = False
        self._next_refresh_at: float | None = None
        self._last_refresh_at: float | None = None
        self._refreshes = 0
        self._attempts = 0
        self._reader_demand_at: float | None = None
        self._failures = 0
        self._last_error: str | None = None
        self._store_error: str | None = None
        self._sealed: str | None = None
        object.__setattr__(self, "revision", 0)

    def __setattr__(self, name: str, value: object) -> None:
        # Every field is private behind a read-only property except `revision`, a plain
        # slot: the token hot path reads it on every request, and a slot read costs a
        # fifth of a property's (7 ns against 35 ns here). This keeps it, and any public
        # name, from being assigned from outside.
        if not name.startswith("_"):
            raise AttributeError(f"Session.{name} changes only through its transitions")
        object.__setattr__(self, name, value)

    def _bump(self) -> None:
        object.__setattr__(self, "revision", self.revision + 1)

    # -- fields (read-only: they change through the transitions below) ----------------

    @property
    def profile(self) -> str:
        return self._profile

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def username(self) -> str | None:
        return self._username

    @property
    def remember(self) -> bool:
        return self._remember

    @property
    def tokens(self) -> Tokens | None:
        return self._tokens

    @property
    def login_required(self) -> bool:
        return self._login_required

    @property
    def next_refresh_at(self) -> float | None:
        return self._next_refresh_at

    @property
    def last_refresh_at(self) -> float | None:
        return self._last_refresh_at

    @property
    def refreshes(self) -> int:
        return self._refreshes

    @property
    def attempts(self) -> int:
        """Refresh attempts that ended, whatever their outcome: a `token` request that
        saw this change has had its one refresh."""
        return self._attempts

    @property
    def reader_demand_at(self) -> float | None:
        """When a reader's demand last brought a refresh forward."""
        return self._reader_demand_at

    @property
    def failures(self) -> int:
        """Consecutive failed refreshes; 0 after a success."""
        return self._failures

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def store_error(self) -> str | None:
        """Why the last write to disk failed, until one succeeds."""
        return self._store_error

    @property
    def sealed(self) -> str | None:
        """Why the saved session does not open (its key is missing), until it does."""
        return self._sealed

    if TYPE_CHECKING:  # a slot at run time (see __setattr__), read-only to mypy

        @property
        def revision(self) -> int:
            """Bumped whenever the served token or the state changes."""

    def __repr__(self) -> str:
        return f"Session(profile={self._profile!r}, state={self.state}, revision={self.revision})"

    # -- reading ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self._sealed is not None:
            return State.SEALED
        if self._login_required:
            return State.LOGIN_REQUIRED
        if self._tokens is None:
            return State.LOGGED_OUT
        if self._failures or self._store_error:
            return State.DEGRADED
        return State.ACTIVE

    def valid_for(self, now: float) -> float:
        """Seconds the bearer has left (negative once expired; -inf without one)."""
        return float("-inf") if self._tokens is None else self._tokens.expires_at - now

    def serves(self, now: float, min_valid: float = 0.0) -> bool:
        """Whether the bearer may be handed out: unexpired, with min_valid seconds left."""
        left = self.valid_for(now)
        return left > 0 and left >= min_valid

    @property
    def can_refresh(self) -> bool:
        return self._tokens is not None and self._tokens.refresh is not None

    def next_action(self, now: float) -> Action:
        tokens = self._tokens
        if tokens is None or tokens.refresh is None or self._login_required:
            return WAIT
        session_end = tokens.session_expires_at
        if session_end is not None and now >= session_end:
            return END_SESSION
        due = self._next_refresh_at
        if due is None or now >= due:
            return REFRESH
        return SleepUntil(due if session_end is None else min(due, session_end))

    def backoff_delay(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt after `failures` failed ones.

        Geins' Retry-After is honoured up to the backoff ceiling and no further: an
        upstream (or a proxy in front of it) saying "in three years" must not park the
        session past its bearer's life; a value that is not a finite, non-negative
        number is ignored."""
        policy = self._policy
        ceiling = min(policy.backoff_cap, policy.backoff_base * 2 ** max(self._failures - 1, 0))
        delay = self._rng.uniform(0, ceiling)
        if retry_after is None or not 0 <= retry_after < _INF:  # (catches NaN too)
            return delay
        return max(delay, min(retry_after, policy.backoff_cap))

    # -- transitions --------------------------------------------------------------------

    def logged_in(self, tokens: Tokens, username: str, remember: bool, now: float) -> None:
        self._username = username
        self._remember = remember
        self._login_required = False
        self._took(tokens, now)

    def refreshed(self, tokens: Tokens, now: float) -> None:
        self._refreshes += 1
        self._attempts += 1
        self._last_refresh_at = now
        self._took(tokens, now)

    def _took(self, tokens: Tokens, now: float) -> None:
        self._tokens = tokens
        self._failures = 0
        self._last_error = None
        self._next_refresh_at = self._rotation_point(tokens)
        self._bump()

    def _rotation_point(self, tokens: Tokens) -> float:
        """When to refresh: at `refresh_at` of whichever runs out first, the bearer or
        the session (a sliding session shorter than a bearer must be kept alive too)."""
        policy = self._policy
        share = policy.refresh_at + self._rng.uniform(-policy.jitter, policy.jitter)
        lifetime = tokens.lifetime
        if tokens.session_expires_at is not None:
            lifetime = min(lifetime, tokens.session_expires_at - tokens.obtained_at)
        return tokens.obtained_at + lifetime * min(max(share, _EARLIEST), _LATEST)

    def refresh_failed(self, reason: str, now: float, retry_after: float | None = None) -> float:
        """A transient failure: keep serving, retry after a backoff. Returns the delay.

        A bearer that runs out before the backoff (or a Retry-After) ends brings the
        retry forward to its expiry: from then on nothing can be served without one."""
        self._failures += 1
        self._attempts += 1
        self._last_error = reason
        delay = self.backoff_delay(retry_after)
        expires_at = self._tokens.expires_at if self._tokens is not None else _INF
        if now < expires_at < now + delay:
            delay = expires_at - now
        self._next_refresh_at = now + delay
        self._bump()
        return delay

    def refresh_rejected(self, reason: str) -> None:
        """The refresh token is dead. The bearer is still served until it expires."""
        self._attempts += 1
        self._login_required = True
        self._last_error = reason
        self._next_refresh_at = None
        if self._tokens is not None:
            self._tokens = replace(self._tokens, refresh=None)
        self._bump()

    def session_ended(self) -> None:
        self.refresh_rejected("the session's lifetime is over; log in again")

    def logged_out(self) -> None:
        self._username = None
        self._tokens = None
        self._login_required = False
        self._next_refresh_at = None
        self._failures = 0
        self._last_error = None
        self._store_error = None
        self._bump()

    def demand_refresh(self, now: float, *, reader: bool = False) -> float:
        """A client needs a longer-lived token: refresh now, unless backing off. Returns
        when the next attempt is due.

        A reader (a uid allowed to read, not to administer) may bring a refresh forward
        at most once per `reader_refresh_interval`: otherwise any reader could make the
        daemon refresh, fsync and log as fast as it can ask."""
        due = self._next_refresh_at
        if self._failures:
            return now if due is None else due
        earliest = now
        if reader and self._reader_demand_at is not None:
            # min(): a wall clock stepped back must not hold readers off for the step.
            last = min(self._reader_demand_at, now)
            earliest = max(now, last + self._policy.reader_refresh_interval)
        if due is None or due > earliest:
            due = self._next_refresh_at = earliest
            if reader:
                self._reader_demand_at = earliest
        return due

    def defer_startup_refresh(self, now: float, spread: float) -> None:
        """After a restart, spread overdue refreshes over `spread` seconds."""
        if self._next_refresh_at is not None and self._next_refresh_at <= now:
            self._next_refresh_at = now + self._rng.uniform(0, spread)

    def refresh_due(self, now: float) -> None:
        """An operator asked, or Geins refused a bearer with time left, or the fleet's
        store is back: rotate now, even while backing off."""
        self._next_refresh_at = now

    def policy_changed(self, policy: Policy) -> None:
        """A reloaded configuration; the next rotation point uses it."""
        self._policy = policy

    def refresh_token_replaced(self, refresh: Secret) -> None:
        """Geins rotated the refresh token but the rest of its answer was unusable: the
        old one is spent, so the new one is kept with the bearer still held."""
        if self._tokens is not None:
            self._tokens = replace(self._tokens, refresh=refresh)
            self._bump()

    def write_failed(self, reason: str) -> None:
        """Saving the session failed: degraded until a write succeeds."""
        if self._store_error is None:
            self._bump()
        self._store_error = reason

    def written(self) -> None:
        """A write succeeded: a degraded store is healthy again."""
        if self._store_error is not None:
            self._store_error = None
            self._bump()

    def found_sealed(self, reason: str) -> None:
        """The saved session does not open (its key is missing): nothing is served."""
        self._sealed = reason
        self._bump()

    def unsealed(self) -> None:
        """The key is back (the saved session, if any, follows through `restored`)."""
        self._sealed = None
        self._bump()

    def restored(self, saved: Saved) -> None:
        """The state saved on disk (or adopted from the fleet), as it was; a bearer is
        never served past its JWT's exp, whatever the record's times say."""
        tokens = None if saved.tokens is None else saved.tokens.within_exp()
        self._tokens = tokens
        self._username = saved.username
        self._remember = saved.remember
        self._login_required = saved.login_required
        self._last_refresh_at = saved.last_refresh_at
        self._refreshes = saved.refreshes
        if tokens is not None and tokens.refresh is not None and not saved.login_required:
            self._next_refresh_at = self._rotation_point(tokens)
        self._bump()

    def adopted(self, saved: Saved, now: float, refused: str) -> None:
        """Fleet mode: a session another node committed (a rotation, a login) replaces
        this one and is served at once. `refused` is the error shown when that session
        needs a login (Geins refused the fleet's refresh token)."""
        self.restored(saved)
        self.defer_startup_refresh(now, 0.0)
        self._failures = 0
        self._last_error = refused if saved.login_required else None
