"""How long a customer session lives, and which sessions make room for a new one.

A session ends at the first of:
- its idle end: `idle` seconds (per tier: remembered or not) after its last use;
- its absolute end: when Geins' refresh token runs out (maxAge from the login);
- eviction: its app or its customer is over the limit and it is the least recently used;
- a logout, an admin's "log out everywhere", or Geins rejecting it (revoked).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class EndReason(StrEnum):
    LOGOUT = "logout"
    IDLE = "idle"
    ABSOLUTE = "absolute"
    EVICTED = "evicted"
    REVOKED = "revoked"


@dataclass(frozen=True, slots=True)
class Lifetime:
    #: Idle timeouts: a remembered customer (the SDK's 7-day cookie) and one who is not
    #: (the SDK's 30-minute cookie, and Geins' 30-minute `sessionLifetime`).
    idle_remembered: float = 7 * 86400.0
    idle_short: float = 30 * 60.0
    #: Live sessions per app and per customer; beyond them the least recently used ends.
    max_sessions: int = 200_000
    max_per_customer: int = 10
    #: A session used within this long is refreshed ahead of its bearer's expiry; one
    #: idle for longer is refreshed only at its next use (a sleeping customer costs
    #: Geins nothing).
    active_for: float = 900.0

    def __post_init__(self) -> None:
        if min(self.idle_remembered, self.idle_short, self.active_for) <= 0:
            raise ValueError("idle timeouts and active_for must be positive")
        if self.max_sessions < 1 or self.max_per_customer < 1:
            raise ValueError("session limits must be at least 1")

    def idle(self, remember: bool) -> float:
        return self.idle_remembered if remember else self.idle_short

    def ends_at(
        self, *, remember: bool, last_used_at: float, session_ends_at: float | None
    ) -> float:
        idle_end = last_used_at + self.idle(remember)
        return idle_end if session_ends_at is None else min(idle_end, session_ends_at)

    def ended(
        self, *, remember: bool, last_used_at: float, session_ends_at: float | None, now: float
    ) -> EndReason | None:
        """Why the session is over at `now`, or None while it lives. A last use in the
        future (a clock stepped back) counts as now, never as an extension."""
        if session_ends_at is not None and now >= session_ends_at:
            return EndReason.ABSOLUTE
        if now >= min(last_used_at, now) + self.idle(remember):
            return EndReason.IDLE
        return None

    def active(self, last_used_at: float, now: float) -> bool:
        return now - last_used_at < self.active_for


def over_limit(count: int, limit: int) -> int:
    """How many of `count` existing sessions must end so one more fits under `limit`."""
    return max(0, count + 1 - limit)
