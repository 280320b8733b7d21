"""What the daemon answers, as small immutable values.

Plain slotted classes: dataclasses (with the inspect module they import) or
NamedTuples (with typing) would cost `geins-broker token` a sizeable share of its
start-up, for nothing a caller would notice.

A bearer token is a credential: `Token.__repr__` leaves it out, so a token that ends up
in a log line or a traceback shows its profile and expiry, never its value.
"""

from __future__ import annotations

import time

from .errors import ProtocolError
from .protocol import is_number

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Value:
    """Fields in `_fields` order, compared and printed by value, never changed."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()
    _hidden: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        values = dict(zip(names, args, strict=False))
        values.update(kwargs)
        if len(args) > len(names) or values.keys() != set(names):
            raise TypeError(f"{type(self).__name__} takes exactly: {', '.join(names)}")
        for name in names:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Value)
            and type(other) is type(self)
            and self._values() == other._values()
        )

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{n}={getattr(self, n)!r}" for n in self._fields if n not in self._hidden
        )
        return f"{type(self).__name__}({shown})"

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def _asdict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields}


class Token(_Value):
    """A bearer token and when it stops working (Unix seconds, wall clock)."""

    _fields = ("profile", "token", "expires_at")
    __slots__ = _fields
    _hidden = ("token",)
    profile: str
    token: str
    expires_at: float
    if TYPE_CHECKING:

        def __init__(self, profile: str, token: str, expires_at: float) -> None: ...

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    @property
    def authorization(self) -> str:
        """The value of an HTTP `Authorization` header."""
        return f"Bearer {self.token}"


class User(_Value):
    """Who the profile's session belongs to, from the bearer token's claims."""

    _fields = (
        "profile",
        "user_id",
        "username",
        "customer_type",
        "member_type",
        "member_id",
        "member_discount",
        "expires_at",
    )
    __slots__ = _fields
    profile: str
    user_id: str
    username: str
    customer_type: str
    member_type: str
    member_id: str
    member_discount: str
    expires_at: float
    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            profile: str,
            user_id: str,
            username: str,
            customer_type: str,
            member_type: str,
            member_id: str,
            member_discount: str,
            expires_at: float,
        ) -> None: ...


class Session(_Value):
    """The outcome of login, register, refresh and change_password."""

    _fields = ("profile", "username", "expires_at")
    __slots__ = _fields
    profile: str
    username: str | None
    expires_at: float
    if TYPE_CHECKING:

        def __init__(self, profile: str, username: str | None, expires_at: float) -> None: ...


class ProfileStatus(_Value):
    _fields = (
        "profile",
        "state",
        "username",
        "expires_at",
        "next_refresh_at",
        "last_refresh_at",
        "refreshes",
        "failures",
        "last_error",
    )
    __slots__ = _fields
    profile: str
    state: str
    username: str | None
    expires_at: float | None
    next_refresh_at: float | None
    last_refresh_at: float | None
    refreshes: int
    failures: int
    last_error: str | None
    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            profile: str,
            state: str,
            username: str | None,
            expires_at: float | None,
            next_refresh_at: float | None,
            last_refresh_at: float | None,
            refreshes: int,
            failures: int,
            last_error: str | None,
        ) -> None: ...


class AppStatus(_Value):
    """One app's customer sessions: stored, and held in memory (refreshed ahead)."""

    _fields = ("app", "sessions", "in_memory")
    __slots__ = _fields
    app: str
    sessions: int
    in_memory: int
    if TYPE_CHECKING:

        def __init__(self, app: str, sessions: int, in_memory: int) -> None: ...


class Status(_Value):
    """`apps`: the apps the caller may use; empty when the daemon has none."""

    _fields = ("server", "uptime", "profiles", "apps")
    __slots__ = _fields
    server: str
    uptime: float
    profiles: tuple[ProfileStatus, ...]
    apps: tuple[AppStatus, ...]
    if TYPE_CHECKING:

        def __init__(
            self,
            server: str,
            uptime: float,
            profiles: tuple[ProfileStatus, ...],
            apps: tuple[AppStatus, ...] = (),
        ) -> None: ...


class CustomerSession(_Value):
    """A customer session just created by `session_login` or `session_register`.

    `handle` names it from now on: keep it where only this customer's requests find
    it (an HTTP-only cookie). The daemon never shows it again, and `repr` never shows it.
    """

    _fields = ("app", "handle", "username", "expires_at", "session_ends_at", "remember")
    __slots__ = _fields
    _hidden = ("handle",)
    app: str
    handle: str
    username: str
    expires_at: float
    session_ends_at: float | None
    remember: bool
    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            app: str,
            handle: str,
            username: str,
            expires_at: float,
            session_ends_at: float | None,
            remember: bool,
        ) -> None: ...


class SessionToken(_Value):
    """A customer's bearer token and when it stops working; `repr` leaves it out."""

    _fields = ("token", "expires_at")
    __slots__ = _fields
    _hidden = ("token",)
    token: str
    expires_at: float
    if TYPE_CHECKING:

        def __init__(self, token: str, expires_at: float) -> None: ...

    def expires_in(self, now: float | None = None) -> float:
        return self.expires_at - (time.time() if now is None else now)

    @property
    def authorization(self) -> str:
        """The value of an HTTP `Authorization` header."""
        return f"Bearer {self.token}"


class SessionInfo(_Value):
    """Who is logged in on a customer session and until when (the SDK's `authorized()`)."""

    _fields = ("username", "customer_type", "expires_at", "session_ends_at", "remember")
    __slots__ = _fields
    username: str
    customer_type: str
    expires_at: float
    session_ends_at: float | None
    remember: bool
    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            username: str,
            customer_type: str,
            expires_at: float,
            session_ends_at: float | None,
            remember: bool,
        ) -> None: ...


class ListedSession(_Value):
    """One customer session as an admin lists it: `session` is 8 hex digits of its
    keyed id, never its handle."""

    _fields = ("session", "username", "created_at", "last_used_at", "ends_at")
    __slots__ = _fields
    session: str
    username: str | None
    created_at: float
    last_used_at: float
    ends_at: float
    if TYPE_CHECKING:

        def __init__(
            self,
            *,
            session: str,
            username: str | None,
            created_at: float,
            last_used_at: float,
            ends_at: float,
        ) -> None: ...


class Hello(_Value):
    _fields = ("version", "server", "ops")
    __slots__ = _fields
    version: int
    server: str
    ops: tuple[str, ...]
    if TYPE_CHECKING:

        def __init__(self, version: int, server: str, ops: tuple[str, ...]) -> None: ...


class WatchEvent(_Value):
    """One frame of a watch stream: a new token, or the session ending (token None)."""

    _fields = ("event", "token")
    __slots__ = _fields
    event: str
    token: Token | None
    if TYPE_CHECKING:

        def __init__(self, event: str, token: Token | None) -> None: ...


def field_of(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """A response field of the expected type, or ProtocolError naming it."""
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"response field {name!r} is missing or has the wrong type")
    return value


def number_field(message: dict[str, Any], name: str) -> float:
    """A numeric response field (int or float, never bool) as a float."""
    value = message.get(name)
    if not is_number(value):
        raise ProtocolError(f"response field {name!r} is missing or is not a number")
    return float(value)


def optional_number(message: dict[str, Any], name: str) -> float | None:
    return None if message.get(name) is None else number_field(message, name)


def optional_field(message: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    return None if message.get(name) is None else field_of(message, name, kind)
