"""The customer-session refusals, each with its wire code.

They extend the daemon's one hierarchy (core/errors.py), so the server maps them to
the wire once, like every other fault.
"""

from __future__ import annotations

from typing import Final

from broker.core.errors import BrokerFault

UNKNOWN_SESSION: Final = "unknown_session"
RATE_LIMITED: Final = "rate_limited"


class UnknownSession(BrokerFault):
    """No live session has this handle in this app. An unknown handle, an ended
    session and another app's handle all raise this, with the same message."""

    code = UNKNOWN_SESSION

    def __init__(self) -> None:
        super().__init__("no such session; log in again")


class RateLimited(BrokerFault):
    """Too many login attempts for this username or from this uid just now."""

    code = RATE_LIMITED

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"too many login attempts; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class RecordUnreadable(Exception):
    """A stored record that does not open or does not parse: a failure of the store,
    never of the daemon. Carries no key material, handle or plaintext."""
