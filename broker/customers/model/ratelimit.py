"""The login rate limit: token buckets per username and per uid, pure values.

A login (or register) costs one token from the username's bucket and one from the
caller uid's; either empty refuses it, consuming nothing, with the time until both
have a token again. So the broker is no faster a password oracle than Geins: one uid
cannot try many passwords on one customer, nor spread over many customers faster
than its own bucket allows.

Time is passed in (wall seconds). A clock stepped back refills nothing and takes
nothing away. The maps are bounded: past `max_keys` the longest-untouched bucket is
dropped (it has refilled the most, so forgetting it grants least).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

K = TypeVar("K")
DEFAULT_MAX_KEYS: Final = 100_000


@dataclass(frozen=True, slots=True)
class Rate:
    #: Tokens added per second, and the most a bucket holds.
    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and self.burst >= 1):
            raise ValueError("a rate needs per_second > 0 and burst >= 1")


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    at: float

    @classmethod
    def full(cls, rate: Rate, now: float) -> Bucket:
        return cls(rate.burst, now)

    def level(self, rate: Rate, now: float) -> Bucket:
        """The bucket as it stands at `now`."""
        elapsed = max(0.0, now - self.at)
        return Bucket(min(rate.burst, self.tokens + elapsed * rate.per_second), max(now, self.at))

    def wait(self, rate: Rate) -> float:
        """Seconds until this (levelled) bucket holds a token; 0 if it does."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / rate.per_second

    def take(self) -> Bucket:
        return Bucket(self.tokens - 1, self.at)


class Buckets(Generic[K]):
    """A bounded map of buckets under one rate."""

    def __init__(self, rate: Rate, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rate = rate
        self._max_keys = max_keys
        self._buckets: OrderedDict[K, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def level(self, key: K, now: float) -> Bucket:
        bucket = self._buckets.get(key)
        return Bucket.full(self.rate, now) if bucket is None else bucket.level(self.rate, now)

    def store(self, key: K, bucket: Bucket) -> None:
        self._buckets[key] = bucket
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)


@dataclass(frozen=True, slots=True)
class LoginRates:
    #: Per username: a burst of 5 attempts, then one a minute.
    per_username: Rate = Rate(1 / 60, 5)
    #: Per calling uid (a storefront's service user logs all its customers in): a burst
    #: of 100, then 10 a second.
    per_uid: Rate = Rate(10.0, 100)


class LoginLimiter:
    def __init__(self, rates: LoginRates | None = None, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rates = rates or LoginRates()
        self._users: Buckets[str] = Buckets(self.rates.per_username, max_keys)
        self._uids: Buckets[int] = Buckets(self.rates.per_uid, max_keys)

    def attempt(self, username: str, uid: int, now: float) -> float:
        """0.0 when the attempt may go ahead (it is counted); otherwise the seconds to
        wait (nothing is counted)."""
        name = username.casefold()
        user, caller = self._users.level(name, now), self._uids.level(uid, now)
        wait = max(user.wait(self._users.rate), caller.wait(self._uids.rate))
        if wait > 0:
            return wait
        self._users.store(name, user.take())
        self._uids.store(uid, caller.take())
        return 0.0
