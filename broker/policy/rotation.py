"""Fleet rotation decisions, with no I/O: given the generation a node holds, what the
shared store shows and the time, what to do.

The protocol (docs/cluster.md has the whole design and the failure table): each shared
profile has one record in the store, a sealed session and a generation number that
every commit raises by one. A node rotates only while it holds the profile's refresh
lease; after taking it, the node re-reads the record, because another node may have
rotated while it waited. A commit is a compare-and-set on the generation, so a node
whose lease ran out while Geins was answering can never overwrite a newer session: the
generation, not the lease, is the fencing token (Kleppmann's point about lease locks).

Every decision here is a function of plain numbers, so tests drive them directly;
`coordinator.py` carries them out against Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final

#: No record in the store (never written, or Redis restarted empty).
ABSENT: Final = 0


class AfterLease(StrEnum):
    #: The store holds what we hold: rotate at Geins, then commit generation + 1.
    REFRESH = "refresh"
    #: Another node rotated while we waited: take its session, release the lease.
    ADOPT = "adopt"
    #: The store has less than we hold: it restarted empty (or missed our commit while
    #: unreachable). Write ours back, give the other nodes `SETTLE_POLLS` polls to write
    #: back theirs (one of them may hold a newer session than ours), then look again.
    SETTLE = "settle"


#: How many poll intervals a node waits, after finding the store behind, before it
#: rotates: every node republishes within one poll, and the highest generation wins.
SETTLE_POLLS: Final = 2


def after_lease(held: int, seen: int) -> AfterLease:
    """The lease is ours and the record re-read: rotate, adopt a newer session, or let
    the fleet settle first.

    Rotating at once when the store is behind would present a refresh token that a
    node we have not heard from may already have rotated: wasted at best, and under
    strict rotation Geins would end the session.
    """
    if seen > held:
        return AfterLease.ADOPT
    if seen < held:
        return AfterLease.SETTLE
    return AfterLease.REFRESH


def commit_generations(held: int, seen: int) -> tuple[int, int]:
    """(expected, new) for the compare-and-set that follows a rotation or a login.

    The commit expects exactly what was seen under the lease, and writes a generation
    above both what we held and what the store had, so the newest session always
    carries the highest number, even after the store lost its data.
    """
    return seen, max(held, seen) + 1


def after_rejection(held: int, seen: int) -> bool:
    """Geins rejected our refresh token: True if the store holds a newer session to
    adopt (another node rotated: our token was simply stale), False if the session is
    really gone and needs a login."""
    return seen > held


def should_fetch(held: int, announced: int) -> bool:
    """A generation was announced (pub/sub) or polled: fetch the record if newer."""
    return announced > held


def should_republish(held: int, seen: int) -> bool:
    """The store has less than we hold (it restarted empty, or our commit failed while
    it was unreachable): write ours back; the store keeps whichever is highest."""
    return held > seen


#: The shortest wait before looking at a lease again: one that was released between
#: the failed take and the look at its expiry is taken at the next try, not in a loop.
MIN_LEASE_WAIT: Final = 0.05


def lease_wait(ttl: float | None, lease_ttl: float) -> float:
    """How long to wait for another holder's lease before trying again: until it
    expires (a holder killed mid-refresh never releases it), at least `MIN_LEASE_WAIT`,
    at most one full TTL. `ttl` None: a lease without expiry, which no node sets;
    waited on as a full lease, so it costs one look per lease time, never a hot loop.
    A commit announced meanwhile ends the wait early."""
    if ttl is None:
        return lease_ttl
    return min(max(ttl, MIN_LEASE_WAIT), lease_ttl)


def extend_every(lease_ttl: float) -> float:
    """Extend a held lease this often: a third of its TTL, so two extensions can be
    late before it lapses."""
    return lease_ttl / 3.0


@dataclass(frozen=True, slots=True)
class Rebase:
    """Turns the committing node's wall times into ours.

    Nodes' clocks may disagree; Redis has one clock. The commit stamps the store's time
    and the committer's own time; a reader measures on the store's clock how long ago
    that was, and shifts the committer's times by the difference between its own clock
    and the committer's (as estimated then). Token lifetimes are therefore counted the
    same on every node, however skewed their clocks.
    """

    shift: float

    @classmethod
    def between(
        cls, committed_at: float, store_committed_ms: int, store_now_ms: int, local_now: float
    ) -> Rebase:
        elapsed = max(store_now_ms - store_committed_ms, 0) / 1000.0
        return cls(local_now - (committed_at + elapsed))

    def __call__(self, when: float | None) -> float | None:
        return None if when is None else when + self.shift


def recent_nodes(seen: dict[str, float], now: float, window: float) -> list[str]:
    """The nodes whose heartbeat is at most `window` seconds old, sorted by name."""
    return sorted(node for node, at in seen.items() if now - at <= window)
