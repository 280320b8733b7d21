"""Requests and how to read their answers, shared by every client flavour.

Each request function returns a `Call` (an op and its fields), each `parse_*` turns an
`ok: true` response into a result. The blocking, trio and asyncio clients differ only
in how they move the bytes (`Exchange` below does the rest), so the meaning of each op
is written once.

No `typing` at run time here (nor in the other modules a blocking client imports):
importing it would add a tenth to the start-up of `geins-broker token`.
"""

from __future__ import annotations

from .errors import BrokerError, ProtocolError, error_from_wire
from .protocol import MAX_RESPONSE_SIZE, FrameDecoder, Op, encode
from .results import (
    AppStatus,
    CustomerSession,
    Hello,
    ListedSession,
    ProfileStatus,
    Session,
    SessionInfo,
    SessionToken,
    Status,
    Token,
    User,
    WatchEvent,
    field_of,
    number_field,
    optional_field,
    optional_number,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, TypeVar

    from .protocol import Message

    T = TypeVar("T")


class Call:
    """A request: its op, its fields, and whether it may be sent twice."""

    __slots__ = ("args", "idempotent", "op")

    def __init__(self, op: str, args: Mapping[str, Any], idempotent: bool = False) -> None:
        self.op = op
        self.args = args
        #: Safe to send again on a new connection if the old one died mid-call.
        self.idempotent = idempotent


def _with_profile(profile: str | None, **args: Any) -> dict[str, Any]:
    if profile is not None:
        args["profile"] = profile
    return {k: v for k, v in args.items() if v is not None}


def parse_token(message: Message) -> Token:
    return Token(
        profile=field_of(message, "profile", str),
        token=field_of(message, "token", str),
        expires_at=number_field(message, "expires_at"),
    )


def parse_session(message: Message) -> Session:
    return Session(
        profile=field_of(message, "profile", str),
        username=optional_field(message, "username", str),
        expires_at=number_field(message, "expires_at"),
    )


def parse_user(message: Message) -> User:
    return User(
        profile=field_of(message, "profile", str),
        user_id=field_of(message, "user_id", str),
        username=field_of(message, "username", str),
        customer_type=field_of(message, "customer_type", str),
        member_type=field_of(message, "member_type", str),
        member_id=field_of(message, "member_id", str),
        member_discount=field_of(message, "member_discount", str),
        expires_at=number_field(message, "expires_at"),
    )


def parse_profile_status(entry: Any) -> ProfileStatus:
    if not isinstance(entry, dict):
        raise ProtocolError("status entry is not a map")

    return ProfileStatus(
        profile=field_of(entry, "profile", str),
        state=field_of(entry, "state", str),
        username=optional_field(entry, "username", str),
        expires_at=optional_number(entry, "expires_at"),
        next_refresh_at=optional_number(entry, "next_refresh_at"),
        last_refresh_at=optional_number(entry, "last_refresh_at"),
        refreshes=field_of(entry, "refreshes", int),
        failures=field_of(entry, "failures", int),
        last_error=optional_field(entry, "last_error", str),
    )


def parse_app_status(entry: Any) -> AppStatus:
    if not isinstance(entry, dict):
        raise ProtocolError("status app entry is not a map")
    return AppStatus(
        app=field_of(entry, "app", str),
        sessions=field_of(entry, "sessions", int),
        in_memory=field_of(entry, "in_memory", int),
    )


def parse_status(message: Message) -> Status:
    apps = () if message.get("apps") is None else field_of(message, "apps", list)
    return Status(
        server=field_of(message, "server", str),
        uptime=number_field(message, "uptime"),
        profiles=tuple(parse_profile_status(p) for p in field_of(message, "profiles", list)),
        apps=tuple(parse_app_status(a) for a in apps),
    )


def parse_customer_session(message: Message) -> CustomerSession:
    return CustomerSession(
        app=field_of(message, "app", str),
        handle=field_of(message, "handle", str),
        username=field_of(message, "username", str),
        expires_at=number_field(message, "expires_at"),
        session_ends_at=optional_number(message, "session_ends_at"),
        remember=field_of(message, "remember", bool),
    )


def parse_session_token(message: Message) -> SessionToken:
    return SessionToken(
        token=field_of(message, "token", str), expires_at=number_field(message, "expires_at")
    )


def parse_session_info(message: Message) -> SessionInfo:
    return SessionInfo(
        username=field_of(message, "username", str),
        customer_type=field_of(message, "customer_type", str),
        expires_at=number_field(message, "expires_at"),
        session_ends_at=optional_number(message, "session_ends_at"),
        remember=field_of(message, "remember", bool),
    )


def parse_expires_at(message: Message) -> float:
    return number_field(message, "expires_at")


def parse_listed_session(entry: Any) -> ListedSession:
    if not isinstance(entry, dict):
        raise ProtocolError("sessions entry is not a map")
    return ListedSession(
        session=field_of(entry, "session", str),
        username=optional_field(entry, "username", str),
        created_at=number_field(entry, "created_at"),
        last_used_at=number_field(entry, "last_used_at"),
        ends_at=number_field(entry, "ends_at"),
    )


def parse_sessions(message: Message) -> tuple[ListedSession, ...]:
    return tuple(parse_listed_session(e) for e in field_of(message, "sessions", list))


def parse_ended(message: Message) -> int:
    ended: int = field_of(message, "ended", int)
    return ended


def parse_hello(message: Message) -> Hello:
    return Hello(
        version=field_of(message, "v", int),
        server=field_of(message, "server", str),
        ops=tuple(field_of(message, "ops", list)),
    )


def parse_watch_event(message: Message) -> WatchEvent:
    event = field_of(message, "event", str)
    return WatchEvent(event, parse_token(message) if event == "token" else None)


def parse_nothing(message: Message) -> None:
    return None


def hello(client: str | None = None) -> Call:
    return Call(Op.HELLO, _with_profile(None, v=1, client=client), idempotent=True)


def token(profile: str | None = None, min_valid: float = 0) -> Call:
    args = _with_profile(profile, min_valid=min_valid or None)
    return Call(Op.TOKEN, args, idempotent=True)


def user(profile: str | None = None) -> Call:
    return Call(Op.USER, _with_profile(profile), idempotent=True)


def status() -> Call:
    return Call(Op.STATUS, {}, idempotent=True)


def login(username: str, password: str, profile: str | None = None, remember: bool = False) -> Call:
    args = _with_profile(profile, username=username, password=password, remember=remember)
    return Call(Op.LOGIN, args)


def logout(profile: str | None = None) -> Call:
    return Call(Op.LOGOUT, _with_profile(profile))


def refresh(profile: str | None = None) -> Call:
    return Call(Op.REFRESH, _with_profile(profile))


def change_password(password: str, new_password: str, profile: str | None = None) -> Call:
    args = _with_profile(profile, password=password, new_password=new_password)
    return Call(Op.CHANGE_PASSWORD, args)


def register(
    username: str,
    password: str,
    profile: str | None = None,
    remember: bool = False,
    user: Mapping[str, Any] | None = None,
) -> Call:
    args = _with_profile(
        profile,
        username=username,
        password=password,
        remember=remember,
        user=dict(user) if user is not None else None,
    )
    return Call(Op.REGISTER, args)


def metrics() -> Call:
    return Call(Op.METRICS, {}, idempotent=True)


def parse_metrics(message: Message) -> str:
    """The exposition text (Prometheus' text format)."""
    text: str = field_of(message, "text", str)
    return text


def session_login(app: str, username: str, password: str, remember: bool = False) -> Call:
    args = {"app": app, "username": username, "password": password, "remember": remember}
    return Call(Op.SESSION_LOGIN, args)


def session_register(
    app: str,
    username: str,
    password: str,
    remember: bool = False,
    user: Mapping[str, Any] | None = None,
) -> Call:
    args = _with_profile(
        None,
        app=app,
        username=username,
        password=password,
        remember=remember,
        user=dict(user) if user is not None else None,
    )
    return Call(Op.SESSION_REGISTER, args)


def session_token(app: str, handle: str, min_valid: float = 0) -> Call:
    args = _with_profile(None, app=app, handle=handle, min_valid=min_valid or None)
    return Call(Op.SESSION_TOKEN, args, idempotent=True)


def session_info(app: str, handle: str) -> Call:
    return Call(Op.SESSION_INFO, {"app": app, "handle": handle}, idempotent=True)


def session_passwd(app: str, handle: str, password: str, new_password: str) -> Call:
    args = {"app": app, "handle": handle, "password": password, "new_password": new_password}
    return Call(Op.SESSION_PASSWD, args)


def session_logout(app: str, handle: str) -> Call:
    return Call(Op.SESSION_LOGOUT, {"app": app, "handle": handle})


def sessions(app: str, username: str | None = None) -> Call:
    return Call(Op.SESSIONS, _with_profile(None, app=app, username=username), idempotent=True)


def session_end(app: str, username: str) -> Call:
    return Call(Op.SESSION_END, {"app": app, "username": username})


def watch(profile: str | None = None) -> Call:
    return Call(Op.WATCH, _with_profile(profile))


def outcome(message: Message) -> Message:
    """The response itself if it says ok, else the typed error it carries."""
    if message.get("ok") is True:
        return message
    error = message.get("error")
    if message.get("ok") is False and isinstance(error, dict):
        raise error_from_wire(error.get("code"), error.get("message"), error.get("retry_after"))
    raise ProtocolError("response has neither ok: true nor an error map")


class Exchange:
    """One connection's request ids and incoming bytes, without the I/O.

    A client sends `request(call)` and feeds what it reads to `receive` until that
    returns the answer to its id. Frames with other ids belong to nobody (the v1 clients
    have one call in flight per connection) and are dropped.
    """

    __slots__ = ("_decoder", "_next_id", "_pending")

    def __init__(self) -> None:
        self._decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        self._next_id = 1
        self._pending: list[Message] = []

    def request(self, call: Call) -> tuple[int, bytes]:
        request_id = self._next_id
        self._next_id += 1
        return request_id, encode({"id": request_id, "op": call.op, **call.args})

    def receive(self, data: bytes, request_id: int) -> Message | None:
        """Feed bytes; the next message for `request_id`, if one is complete."""
        self._pending.extend(self._decoder.feed(data))
        if self._decoder.error is not None:
            raise ProtocolError(f"unreadable response: {self._decoder.error}")
        while self._pending:
            message = self._pending.pop(0)
            if message.get("id") == request_id:
                return message
            if message.get("id") is None and message.get("ok") is False:
                outcome(message)  # a connection-level error such as busy: raise it
        return None


def answer(parse: Callable[[Message], T], message: Message) -> T:
    """The result a response carries, or the error it carries."""
    try:
        return parse(outcome(message))
    except BrokerError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed response: {exc}") from None
