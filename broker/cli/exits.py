"""The CLI's exit codes, what each means, and how a client error and a failure line map
to them: written once, for the full CLI (`main`) and its fast path (`quick`).

Imports only the client's error classes: `geins-broker token` loads this on its way to
the socket.
"""

from __future__ import annotations

import sys

from broker.cli.output import terminal_safe
from geins_broker_client import errors as client_errors

TYPE_CHECKING = False  # not even typing at run time: `geins-broker token` loads this
if TYPE_CHECKING:
    from collections.abc import Sequence

    from geins_broker_client.results import ProfileStatus

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_NOT_LOGGED_IN = 4
EXIT_LOGIN_REQUIRED = 5
EXIT_FORBIDDEN = 6
EXIT_UNAVAILABLE = 7
EXIT_INVALID_CREDENTIALS = 8
EXIT_UPSTREAM_ERROR = 9
EXIT_UNKNOWN_PROFILE = 10

#: What each exit code means: `--help` prints it and a test holds the README to it.
EXIT_MEANINGS: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_INTERNAL: "internal error",
    EXIT_USAGE: "bad input",
    EXIT_NOT_RUNNING: "broker not running (or its socket not to be trusted)",
    EXIT_NOT_LOGGED_IN: "not logged in",
    EXIT_LOGIN_REQUIRED: "login required (or the customer session is gone)",
    EXIT_FORBIDDEN: "forbidden",
    EXIT_UNAVAILABLE: "Geins unavailable, timeout or rate limited",
    EXIT_INVALID_CREDENTIALS: "invalid credentials",
    EXIT_UPSTREAM_ERROR: "Geins error",
    EXIT_UNKNOWN_PROFILE: "unknown profile or app",
}

#: Exit code per client error family; the most specific class wins.
EXIT_CODES: tuple[tuple[type[client_errors.BrokerError], int], ...] = (
    (client_errors.BrokerNotRunning, EXIT_NOT_RUNNING),
    # No broker we may trust is running: the socket found is another user's.
    (client_errors.UntrustedSocket, EXIT_NOT_RUNNING),
    (client_errors.NotLoggedIn, EXIT_NOT_LOGGED_IN),
    (client_errors.LoginRequired, EXIT_LOGIN_REQUIRED),
    (client_errors.Forbidden, EXIT_FORBIDDEN),
    (client_errors.Unavailable, EXIT_UNAVAILABLE),
    (client_errors.InvalidCredentials, EXIT_INVALID_CREDENTIALS),
    (client_errors.UpstreamError, EXIT_UPSTREAM_ERROR),
    (client_errors.UnknownProfile, EXIT_UNKNOWN_PROFILE),
    (client_errors.UnknownApp, EXIT_UNKNOWN_PROFILE),
    (client_errors.UnknownSession, EXIT_LOGIN_REQUIRED),
    (client_errors.RateLimited, EXIT_UNAVAILABLE),
    (client_errors.ProtocolError, EXIT_USAGE),
)


class UsageError(Exception):
    """Bad input found after argument parsing (an empty password, a closed stdin): the
    full CLI reports it with EXIT_USAGE."""


def report(message: str, code: int) -> int:
    """Print one failure line on stderr and give back `code`. Messages may repeat the
    daemon's, which repeat Geins' or the store's: escaped (broker.cli.output)."""
    print(f"geins-broker: {terminal_safe(message)}", file=sys.stderr)
    return code


def report_broker_error(exc: client_errors.BrokerError) -> int:
    """The failure line and exit code for an error the client raised."""
    code = next((c for cls, c in EXIT_CODES if isinstance(exc, cls)), EXIT_INTERNAL)
    return report(f"{exc.code.replace('_', ' ')}: {exc.message}", code)


def check_health(profiles: Sequence[ProfileStatus], name: str | None) -> int:
    """`status --check`: one line and the verdict's exit code, for ExecCondition= and
    monitoring."""
    import time

    from geins_broker_client.health import judge

    if name is not None and not profiles:
        return report(f"unknown profile: no profile {name!r} is configured", EXIT_UNKNOWN_PROFILE)
    health = judge(profiles, time.time())
    print(terminal_safe(health.line()))
    return health.code
