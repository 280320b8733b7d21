"""What each op takes: field names, types and defaults, checked once at the door.

A readable request with a missing or mistyped field is answered `bad_request` naming
the field; the connection stays open. Unknown fields are ignored, so a newer client can
talk to an older daemon. Passwords become `Secret`s here, before anything else sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker.core.errors import BadRequest
from broker.core.secret import Secret
from geins_broker_client.protocol import DEFAULT_PROFILE, Op, is_number

_MAX_TEXT: Final = 1024
_MAX_USER_DEPTH: Final = 8


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT:
        raise BadRequest(
            f"field {name!r} must be a non-empty string of at most {_MAX_TEXT} characters"
        )
    return value


def _secret(name: str, value: Any) -> Secret:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise BadRequest(f"field {name!r} must be a string of at most {_MAX_TEXT} characters")
    return Secret(value)


def _handle(name: str, value: Any) -> Secret:
    """A session handle, kept secret from here on. Its shape is not checked here: a
    malformed handle is an unknown session (`unknown_session`), like any other."""
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise BadRequest(f"field {name!r} must be a string of at most {_MAX_TEXT} characters")
    return Secret(value)


def _seconds(name: str, value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise BadRequest(f"field {name!r} must be a number of seconds, 0 or more")
    return float(value)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {name!r} must be an integer")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"field {name!r} must be true or false")
    return value


def _json_like(value: Any, depth: int = 0) -> bool:
    if depth > _MAX_USER_DEPTH:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_like(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_json_like(v, depth + 1) for v in value)
    return value is None or isinstance(value, str | int | float | bool)


def _user_map(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not _json_like(value):
        raise BadRequest(f"field {name!r} must be a map of JSON values (the Geins UserInputType)")
    return value


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    check: Callable[[str, Any], Any]
    required: bool = False
    default: Any = None


_PROFILE = Field("profile", _text, default=DEFAULT_PROFILE)
_APP = Field("app", _text, required=True)
_HANDLE = Field("handle", _handle, required=True)
_CREDENTIALS = (
    Field("username", _text, required=True),
    Field("password", _secret, required=True),
    Field("remember", _flag, default=False),
)

SCHEMAS: Final[Mapping[str, tuple[Field, ...]]] = {
    Op.HELLO: (Field("v", _int, default=1), Field("client", _text)),
    Op.TOKEN: (_PROFILE, Field("min_valid", _seconds, default=0.0)),
    Op.USER: (_PROFILE,),
    Op.STATUS: (),
    Op.LOGIN: (
        _PROFILE,
        Field("username", _text, required=True),
        Field("password", _secret, required=True),
        Field("remember", _flag, default=False),
    ),
    Op.LOGOUT: (_PROFILE,),
    Op.REFRESH: (_PROFILE,),
    Op.CHANGE_PASSWORD: (
        _PROFILE,
        Field("password", _secret, required=True),
        Field("new_password", _secret, required=True),
    ),
    Op.REGISTER: (
        _PROFILE,
        Field("username", _text, required=True),
        Field("password", _secret, required=True),
        Field("remember", _flag, default=False),
        Field("user", _user_map),
    ),
    Op.WATCH: (_PROFILE,),
    Op.METRICS: (),
    Op.SESSION_LOGIN: (_APP, *_CREDENTIALS),
    Op.SESSION_REGISTER: (_APP, *_CREDENTIALS, Field("user", _user_map)),
    Op.SESSION_TOKEN: (_APP, _HANDLE, Field("min_valid", _seconds, default=0.0)),
    Op.SESSION_INFO: (_APP, _HANDLE),
    Op.SESSION_PASSWD: (
        _APP,
        _HANDLE,
        Field("password", _secret, required=True),
        Field("new_password", _secret, required=True),
    ),
    Op.SESSION_LOGOUT: (_APP, _HANDLE),
    Op.SESSIONS: (_APP, Field("username", _text)),
    Op.SESSION_END: (_APP, Field("username", _text, required=True)),
}


def arguments(op: str, message: Mapping[str, Any]) -> dict[str, Any]:
    """The op's arguments with defaults filled in, or BadRequest naming the bad field."""
    args: dict[str, Any] = {}
    for field in SCHEMAS[op]:
        value = message.get(field.name)
        if value is None:
            if field.required:
                raise BadRequest(f"{op} needs the field {field.name!r}")
            args[field.name] = field.default
        else:
            args[field.name] = field.check(field.name, value)
    return args
