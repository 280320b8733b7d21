"""When a customer session refreshes: policy/session.py's rules, applied to one record.

A customer session is a profile session with a different trigger. The rules (the
rotation point inside the bearer's or the session's lifetime with its jitter, the
backoff after a failure and how far Retry-After is believed, what a bearer must have
left to be served) are `Session`'s and `Policy`'s, called here, not copied. What
differs is when they apply: a session in use (lifetime.Lifetime.active) is refreshed at
its rotation point; an idle one waits for its next use, which refreshes it first if
its bearer cannot serve.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from broker.core.secret import Secret
from broker.geins import claims
from broker.policy.session import Policy, Saved, Session, Tokens


def tokens(
    bearer: Secret,
    refresh: Secret,
    obtained_at: float,
    expires_at: float,
    session_ends_at: float | None,
) -> Tokens:
    """A session's tokens as policy/session.py holds them (the claims decoded again:
    they are not stored, the bearer holds them)."""
    decoded = claims.decode(bearer.reveal())
    return Tokens(bearer, refresh, decoded, obtained_at, expires_at, session_ends_at)


def _session(policy: Policy, rng: random.Random, token_set: Tokens, failures: int = 0) -> Session:
    """A Session holding `token_set` after `failures` failed refreshes in a row, built
    through its own transitions (it owns its state)."""
    session = Session("customer", policy, rng)
    session.restored(Saved(token_set, None, False, False, None, 0))
    for _ in range(failures):
        session.refresh_failed("", token_set.obtained_at)
    return session


def rotation_due_at(token_set: Tokens, policy: Policy, rng: random.Random) -> float:
    """When a session in use refreshes next, after getting `token_set`."""
    session = _session(policy, rng, token_set)
    session.refreshed(token_set, token_set.obtained_at)
    due = session.next_refresh_at
    assert due is not None
    return due


@dataclass(frozen=True, slots=True)
class Retry:
    failures: int
    at: float


def retry_after_failure(
    token_set: Tokens,
    failures: int,
    now: float,
    policy: Policy,
    rng: random.Random,
    *,
    retry_after: float | None = None,
) -> Retry:
    """When to try again after the `failures + 1`-th failure in a row."""
    session = _session(policy, rng, token_set, failures)
    delay = session.refresh_failed("", now, retry_after)
    return Retry(session.failures, now + delay)


class Demand(Enum):
    #: The bearer can be served as it is.
    SERVE = "serve"
    #: Refresh first (single flight), then serve.
    REFRESH = "refresh"
    #: The last refresh failed and the backoff has not run out: say so.
    BACKING_OFF = "backing_off"


def on_demand(expires_at: float, now: float, min_valid: float, retry_at: float | None) -> Demand:
    """What a token request does: serve while the bearer has `min_valid` seconds left,
    otherwise refresh unless a failure's backoff is still running.

    The serving rule is Session.serves on plain numbers (tests/customers hold the two
    equal): this runs on every token request, where building a Session would cost more
    than the answer."""
    left = expires_at - now
    if left > 0 and left >= min_valid:
        return Demand.SERVE
    if retry_at is not None and now < retry_at:
        return Demand.BACKING_OFF
    return Demand.REFRESH
