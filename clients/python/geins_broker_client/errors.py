"""Typed errors: one class per family of wire error codes.

A caller catches the family it can act on (`LoginRequired`: ask a person to log in;
`Unavailable`: try again later) and still finds the exact `code` and the daemon's
`message` on the exception. Messages never hold a token or a password: the daemon
never puts one there, and the client adds none.
"""

from __future__ import annotations

from .protocol import Code, is_number


class BrokerError(Exception):
    """Any failure of a call to the broker."""

    code: str = Code.INTERNAL

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


class BrokerNotRunning(BrokerError):
    """No daemon answers at the socket (missing, refused, or closed on us)."""

    code = "not_running"


class UntrustedSocket(BrokerError):
    """The socket found is not provably the daemon's: nothing was sent to it.

    Its directory or file belongs to a uid the client does not trust, others may write
    the directory, or the process listening runs as such a uid (see docs/protocol.md,
    "Finding and trusting the socket"). The message names the path and the reason.
    """

    code = "untrusted_socket"


class ProtocolError(BrokerError):
    """The two sides do not understand each other: bad_frame, bad_request, unknown_op."""

    code = Code.BAD_REQUEST


class UnknownProfile(BrokerError):
    code = Code.UNKNOWN_PROFILE


class Forbidden(BrokerError):
    """The daemon refused this uid for this operation or profile."""

    code = Code.FORBIDDEN


class NotLoggedIn(BrokerError):
    """Nobody has logged in to this profile (or someone logged out)."""

    code = Code.NOT_LOGGED_IN


class LoginRequired(BrokerError):
    """The session ended upstream (refresh token rejected or expired): log in again."""

    code = Code.LOGIN_REQUIRED


class InvalidCredentials(BrokerError):
    """Geins refused the username or password."""

    code = Code.INVALID_CREDENTIALS


class Unavailable(BrokerError):
    """Try again later: Geins unreachable, a timeout, or the daemon is busy."""

    code = Code.UPSTREAM_UNAVAILABLE


class UpstreamError(BrokerError):
    """Geins answered, but not with something the broker could use."""

    code = Code.UPSTREAM_ERROR


class InternalError(BrokerError):
    code = Code.INTERNAL


class UnknownApp(BrokerError):
    """No `[apps.NAME]` of that name in the daemon's configuration."""

    code = Code.UNKNOWN_APP


class UnknownSession(BrokerError):
    """The handle names no live session of this app (it never did, it ended, it was
    logged out, or it is another app's): log the customer in again."""

    code = Code.UNKNOWN_SESSION


class RateLimited(BrokerError):
    """Too many login or register attempts for this username or from this uid:
    `retry_after` says how many seconds to wait."""

    code = Code.RATE_LIMITED

    def __init__(self, message: str, code: str | None = None, retry_after: float = 0.0) -> None:
        super().__init__(message, code)
        self.retry_after = retry_after


_FAMILIES: dict[str, type[BrokerError]] = {
    Code.BAD_FRAME: ProtocolError,
    Code.BAD_REQUEST: ProtocolError,
    Code.UNKNOWN_OP: ProtocolError,
    Code.UNKNOWN_PROFILE: UnknownProfile,
    Code.FORBIDDEN: Forbidden,
    Code.NOT_LOGGED_IN: NotLoggedIn,
    Code.LOGIN_REQUIRED: LoginRequired,
    Code.INVALID_CREDENTIALS: InvalidCredentials,
    Code.UPSTREAM_UNAVAILABLE: Unavailable,
    Code.TIMEOUT: Unavailable,
    Code.BUSY: Unavailable,
    Code.UPSTREAM_ERROR: UpstreamError,
    Code.INTERNAL: InternalError,
    Code.UNKNOWN_APP: UnknownApp,
    Code.UNKNOWN_SESSION: UnknownSession,
    Code.RATE_LIMITED: RateLimited,
}


def error_from_wire(code: object, message: object, retry_after: object = None) -> BrokerError:
    """The exception for an `error` map; an unknown code from a newer daemon is kept.
    `retry_after` (the map's field of that name) is kept by `RateLimited` when it is a
    finite number of seconds, 0 or more; anything else counts as 0."""
    code_text = code if isinstance(code, str) else Code.INTERNAL
    message_text = message if isinstance(message, str) else "(no message)"
    family = _FAMILIES.get(code_text, BrokerError)
    if family is RateLimited:
        wait = float(retry_after) if is_number(retry_after) else 0.0
        return RateLimited(message_text, code_text, wait if 0 <= wait < float("inf") else 0.0)
    return family(message_text, code_text)
