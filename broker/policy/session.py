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
from typing import Final

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

REFRESH: Final = Refresh()
WAIT: Final = Wait()
END_SESSION: Final = EndSession()


class Session:
    def __init__(
        self, profile: str, policy: Policy | None = None, rng: random.Random | None = None
    ) -> None:
        self.profile = profile
        self.policy = policy or Policy()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.username: str | None = None
        self.remember = False
        self.tokens: Tokens | None = None
        self.login_required = False
        self.next_refresh_at: float | None = None
        self.last_refresh_at: float | None = None
        self.refreshes = 0
        #: Refresh attempts that ended, whatever their outcome: a `token` request that
        #: saw this change has had its one refresh.
        self.attempts = 0
        #: When a reader's demand last brought a refresh forward.
        self.reader_demand_at: float | None = None
        #: Consecutive failed refreshes; 0 after a success.
        self.failures = 0
        self.last_error: str | None = None
        #: Why the last write to disk failed, until one succeeds.
        self.store_error: str | None = None
        #: Why the saved session does not open (its key is missing), until it does.
        self.sealed: str | None = None
        #: Bumped whenever the served token or the state changes.
        self.revision = 0

    def __repr__(self) -> str:
        return f"Session(profile={self.profile!r}, state={self.state}, revision={self.revision})"

    # -- reading ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self.sealed is not None:
            return State.SEALED
        if self.login_required:
            return State.LOGIN_REQUIRED
        if self.tokens is None:
            return State.LOGGED_OUT
        if self.failures or self.store_error:
            return State.DEGRADED
        return State.ACTIVE

    def valid_for(self, now: float) -> float:
        """Seconds the bearer has left (negative once expired; -inf without one)."""
        return float("-inf") if self.tokens is None else self.tokens.expires_at - now

    def serves(self, now: float, min_valid: float = 0.0) -> bool:
        """Whether the bearer may be handed out: unexpired, with min_valid seconds left."""
        left = self.valid_for(now)
        return left > 0 and left >= min_valid

    @property
    def can_refresh(self) -> bool:
        return self.tokens is not None and self.tokens.refresh is not None

    def next_action(self, now: float) -> Action:
        tokens = self.tokens
        if tokens is None or tokens.refresh is None or self.login_required:
            return WAIT
        session_end = tokens.session_expires_at
        if session_end is not None and now >= session_end:
            return END_SESSION
        due = self.next_refresh_at
        if due is None or now >= due:
            return REFRESH
        return SleepUntil(due if session_end is None else min(due, session_end))

    def backoff_delay(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt after `failures` failed ones.

        Geins' Retry-After is honoured up to the backoff ceiling and no further: an
        upstream (or a proxy in front of it) saying "in three years" must not park the
        session past its bearer's life; a value that is not a finite, non-negative
        number is ignored."""
        policy = self.policy
        ceiling = min(policy.backoff_cap, policy.backoff_base * 2 ** max(self.failures - 1, 0))
        delay = self._rng.uniform(0, ceiling)
        if retry_after is None or not 0 <= retry_after < _INF:  # (catches NaN too)
            return delay
        return max(delay, min(retry_after, policy.backoff_cap))

    # -- transitions --------------------------------------------------------------------

    def logged_in(self, tokens: Tokens, username: str, remember: bool, now: float) -> None:
        self.username = username
        self.remember = remember
        self.login_required = False
        self._took(tokens, now)

    def refreshed(self, tokens: Tokens, now: float) -> None:
        self.refreshes += 1
        self.attempts += 1
        self.last_refresh_at = now
        self._took(tokens, now)

    def _took(self, tokens: Tokens, now: float) -> None:
        self.tokens = tokens
        self.failures = 0
        self.last_error = None
        self.next_refresh_at = self._rotation_point(tokens)
        self.revision += 1

    def _rotation_point(self, tokens: Tokens) -> float:
        """When to refresh: at `refresh_at` of whichever runs out first, the bearer or
        the session (a sliding session shorter than a bearer must be kept alive too)."""
        policy = self.policy
        share = policy.refresh_at + self._rng.uniform(-policy.jitter, policy.jitter)
        lifetime = tokens.lifetime
        if tokens.session_expires_at is not None:
            lifetime = min(lifetime, tokens.session_expires_at - tokens.obtained_at)
        return tokens.obtained_at + lifetime * min(max(share, _EARLIEST), _LATEST)

    def refresh_failed(self, reason: str, now: float, retry_after: float | None = None) -> float:
        """A transient failure: keep serving, retry after a backoff. Returns the delay.

        A bearer that runs out before the backoff (or a Retry-After) ends brings the
        retry forward to its expiry: from then on nothing can be served without one."""
        self.failures += 1
        self.attempts += 1
        self.last_error = reason
        delay = self.backoff_delay(retry_after)
        expires_at = self.tokens.expires_at if self.tokens is not None else _INF
        if now < expires_at < now + delay:
            delay = expires_at - now
        self.next_refresh_at = now + delay
        self.revision += 1
        return delay

    def refresh_rejected(self, reason: str) -> None:
        """The refresh token is dead. The bearer is still served until it expires."""
        self.attempts += 1
        self.login_required = True
        self.last_error = reason
        self.next_refresh_at = None
        if self.tokens is not None:
            self.tokens = replace(self.tokens, refresh=None)
        self.revision += 1

    def session_ended(self) -> None:
        self.refresh_rejected("the session's lifetime is over; log in again")

    def logged_out(self) -> None:
        self.username = None
        self.tokens = None
        self.login_required = False
        self.next_refresh_at = None
        self.failures = 0
        self.last_error = None
        self.store_error = None
        self.revision += 1

    def demand_refresh(self, now: float, *, reader: bool = False) -> float:
        """A client needs a longer-lived token: refresh now, unless backing off. Returns
        when the next attempt is due.

        A reader (a uid allowed to read, not to administer) may bring a refresh forward
        at most once per `reader_refresh_interval`: otherwise any reader could make the
        daemon refresh, fsync and log as fast as it can ask."""
        due = self.next_refresh_at
        if self.failures:
            return now if due is None else due
        earliest = now
        if reader and self.reader_demand_at is not None:
            # min(): a wall clock stepped back must not hold readers off for the step.
            last = min(self.reader_demand_at, now)
            earliest = max(now, last + self.policy.reader_refresh_interval)
        if due is None or due > earliest:
            due = self.next_refresh_at = earliest
            if reader:
                self.reader_demand_at = earliest
        return due

    def defer_startup_refresh(self, now: float, spread: float) -> None:
        """After a restart, spread overdue refreshes over `spread` seconds."""
        if self.next_refresh_at is not None and self.next_refresh_at <= now:
            self.next_refresh_at = now + self._rng.uniform(0, spread)

    def restored(
        self,
        *,
        tokens: Tokens | None,
        username: str | None,
        remember: bool,
        login_required: bool,
        last_refresh_at: float | None,
        refreshes: int,
    ) -> None:
        """The state saved on disk (or adopted from the fleet), as it was; a bearer is
        never served past its JWT's exp, whatever the record's times say."""
        self.tokens = None if tokens is None else tokens.within_exp()
        self.username = username
        self.remember = remember
        self.login_required = login_required
        self.last_refresh_at = last_refresh_at
        self.refreshes = refreshes
        if tokens is not None and tokens.refresh is not None and not login_required:
            self.next_refresh_at = self._rotation_point(tokens)
        self.revision += 1
