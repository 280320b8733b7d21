"""What the daemon answers, as small immutable values.

NamedTuples rather than dataclasses: importing dataclasses (and the inspect module it
pulls in) would cost `geins-broker token` about a third of its start-up time.

A bearer token is a credential: `Token.__repr__` leaves it out, so a token that ends up
in a log line or a traceback shows its profile and expiry, never its value.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from .errors import ProtocolError


class Token(NamedTuple):
    """A bearer token and when it stops working (Unix seconds, wall clock)."""

    profile: str
    token: str
    expires_at: float

    def __repr__(self) -> str:
        return f"Token(profile={self.profile!r}, expires_at={self.expires_at!r})"

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    @property
    def authorization(self) -> str:
        """The value of an HTTP `Authorization` header."""
        return f"Bearer {self.token}"


class User(NamedTuple):
    """Who the profile's session belongs to, from the bearer token's claims."""

    profile: str
    user_id: str
    username: str
    customer_type: str
    member_type: str
    member_id: str
    member_discount: str
    expires_at: float


class Session(NamedTuple):
    """The outcome of login, register, refresh and change_password."""

    profile: str
    username: str | None
    expires_at: float


class ProfileStatus(NamedTuple):
    profile: str
    state: str
    username: str | None
    expires_at: float | None
    next_refresh_at: float | None
    last_refresh_at: float | None
    refreshes: int
    failures: int
    last_error: str | None


class Status(NamedTuple):
    server: str
    uptime: float
    profiles: tuple[ProfileStatus, ...]

    @property
    def needs_login(self) -> tuple[ProfileStatus, ...]:
        return tuple(p for p in self.profiles if p.state == "login_required")


class Hello(NamedTuple):
    version: int
    server: str
    ops: tuple[str, ...]


class WatchEvent(NamedTuple):
    """One frame of a watch stream: a new token, or the session ending."""

    event: str
    token: Token | None = None


def field_of(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A response field of the expected type, or ProtocolError naming it."""
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"response field {name!r} is missing or has the wrong type")
    return value


def optional_field(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    return None if message.get(name) is None else field_of(message, name, kind)
