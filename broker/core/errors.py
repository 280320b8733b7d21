"""The daemon's errors: one small hierarchy, each class carrying its wire code.

Raised where the failure is understood (the Geins client, a session, the store), caught
once by the server, which sends `code` and `str(exc)` to the client. Messages are for
people and never contain a password, a bearer token or a refresh token.
"""

from __future__ import annotations

from broker.core.secret import Secret
from geins_broker_client.protocol import Code


class BrokerFault(Exception):
    code: str = Code.INTERNAL


# -- Geins answered, or failed to -------------------------------------------------------


class GeinsError(BrokerFault):
    """Any failed exchange with Geins."""

    code = Code.UPSTREAM_ERROR


class InvalidCredentials(GeinsError):
    """Wrong username or password (login, password change), or a taken username (register)."""

    code = Code.INVALID_CREDENTIALS


class RefreshTokenRejected(GeinsError):
    """The refresh token is dead: only a new login revives the session. Never retried."""

    code = Code.LOGIN_REQUIRED


class MalformedAnswer(GeinsError):
    """Geins answered 2xx without what the protocol promises (header, JSON body, JWT)."""


class UnusableGrant(MalformedAnswer):
    """Geins rotated the refresh token (the new one is in the header) but the rest of
    its answer is unusable. The old refresh token is spent, so whoever catches this
    must keep `refresh`; it is not in the message, the args or the repr."""

    def __init__(self, message: str, refresh: Secret) -> None:
        super().__init__(message)
        self.refresh = refresh


class UpstreamRejected(GeinsError):
    """A 4xx other than a credential failure: the request or the configuration is wrong."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Transient(GeinsError):
    """Worth retrying later: refused, reset, timed out, 5xx or 429."""

    code = Code.UPSTREAM_UNAVAILABLE

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FleetUnavailable(Transient):
    """The fleet's store (Redis) cannot be reached or cannot take the lease now: a
    shared session is not refreshed, and the held bearer is served while it lasts."""


class UpstreamTimeout(Transient):
    code = Code.TIMEOUT


# -- the daemon's own refusals --------------------------------------------------------------


class Internal(BrokerFault):
    """A bug: the details are in the daemon's log, not on the wire."""


class BadFrame(BrokerFault):
    code = Code.BAD_FRAME


class BadRequest(BrokerFault):
    code = Code.BAD_REQUEST


class UnknownOp(BrokerFault):
    code = Code.UNKNOWN_OP


class UnknownProfile(BrokerFault):
    code = Code.UNKNOWN_PROFILE


class Forbidden(BrokerFault):
    code = Code.FORBIDDEN


class NotLoggedIn(BrokerFault):
    code = Code.NOT_LOGGED_IN


class LoginRequired(BrokerFault):
    code = Code.LOGIN_REQUIRED


class SessionSealed(BrokerFault):
    """The saved session is sealed with a key the daemon lacks: nothing may replace it
    (a login would overwrite it) until the key is back. No session to serve, hence the
    code."""

    code = Code.NOT_LOGGED_IN


class UnknownApp(BrokerFault):
    code = Code.UNKNOWN_APP


class UnknownSession(BrokerFault):
    """No live customer session has this handle in this app. An unknown handle, an
    ended session and another app's handle all raise this, with the same message."""

    code = Code.UNKNOWN_SESSION

    def __init__(self) -> None:
        super().__init__("no such session; log in again")


class RateLimited(BrokerFault):
    """Too many login attempts for this username or from this uid just now; the wire's
    error map carries `retry_after`."""

    code = Code.RATE_LIMITED

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many login attempts; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Busy(BrokerFault):
    code = Code.BUSY


class Timeout(BrokerFault):
    code = Code.TIMEOUT


class StoreError(BrokerFault):
    """The state directory refused a write or a read; the reason is the OS's."""


class StateDirError(StoreError):
    """The state directory cannot be trusted (a link, another uid's, writable by others)
    or another process holds its lock: the daemon refuses to start (exit 2)."""


class Relayed(BrokerFault):
    """An earlier failure told again, to a caller who was waiting on that attempt."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
