"""Whether the broker is healthy, in one verdict: an exit code and a one-line reason.

`geins-broker status --check` (systemd's ExecCondition, monitoring scripts) and the
daemon's `GET /healthz` judge with this one function, so they never disagree.

The worst profile decides: a session that needs a login (5) is worse than a profile
nobody logged in to (4), which is worse than a degraded one (1: refreshing or saving
fails for now, the bearer is still served while it lasts). Pure: values in, a value out.
"""

from __future__ import annotations

TYPE_CHECKING = False  # no typing at run time: see calls.py
if TYPE_CHECKING:
    from collections.abc import Iterable

    from .results import ProfileStatus

HEALTHY = 0
DEGRADED = 1
NOT_LOGGED_IN = 4
LOGIN_REQUIRED = 5

#: The exit code of each state; a state this client does not know counts as degraded.
_CODES = {"active": HEALTHY, "degraded": DEGRADED, "logged_out": NOT_LOGGED_IN}
_CODES["login_required"] = LOGIN_REQUIRED
_WORDS = {HEALTHY: "healthy", DEGRADED: "degraded", NOT_LOGGED_IN: "not logged in"}
_WORDS[LOGIN_REQUIRED] = "login required"


class Health:
    """A verdict: `code` (0, 1, 4 or 5), `status` (a word) and `reason` (one line)."""

    __slots__ = ("code", "reason", "status")

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.status = _WORDS[code]
        self.reason = reason

    @property
    def http_status(self) -> int:
        """What `GET /healthz` answers: 200 while tokens can be had without a person."""
        return 200 if self.code in (HEALTHY, DEGRADED) else 503

    def line(self) -> str:
        return f"{self.status}: {self.reason}"

    def __repr__(self) -> str:
        return f"Health({self.code}, {self.reason!r})"


def judge(profiles: Iterable[ProfileStatus], now: float) -> Health:
    """The verdict on these profiles at wall time `now` (Unix seconds)."""
    worst, count = HEALTHY, 0
    culprits: list[str] = []
    for profile in profiles:
        count += 1
        code = _CODES.get(profile.state, DEGRADED)
        if code == DEGRADED and profile.expires_at is not None and profile.expires_at <= now:
            why = "token expired"
        else:
            why = (profile.last_error or profile.state.replace("_", " ")).replace("\n", " ")
        if code > worst:
            worst, culprits = code, []
        if code == worst and code != HEALTHY:
            culprits.append(f"{profile.profile} ({why})")
    if count == 0:
        return Health(NOT_LOGGED_IN, "no profile to judge")
    if worst == HEALTHY:
        noun = "profile" if count == 1 else "profiles"
        return Health(HEALTHY, f"{count} {noun} active")
    more = f" and {len(culprits) - 3} more" if len(culprits) > 3 else ""
    return Health(worst, "; ".join(culprits[:3]) + more)


__all__ = ["DEGRADED", "HEALTHY", "LOGIN_REQUIRED", "NOT_LOGGED_IN", "Health", "judge"]
