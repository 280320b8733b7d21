"""Injected upstream faults: which request gets which failure, and for how long.

Pure bookkeeping: the HTTP shell asks `pick` for each request (with trio's clock, so a
fault "for 30 s" lasts 30 virtual seconds under MockClock) and carries the fault out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

KINDS: Final = ("refuse", "status", "latency", "stall", "truncate", "body")


class FaultSpecError(ValueError):
    pass


@dataclass(slots=True)
class Fault:
    """One rule. `match` is a substring of "METHOD /path" (None: every request).

    Kinds: refuse (close the port), status (answer `status` instead), latency (answer
    `seconds` late), stall (never answer), truncate (answer the head and half the body,
    then close the connection)."""

    kind: str
    match: str | None = None
    status: int = 503
    retry_after: str | None = None
    #: latency: seconds to wait; refuse: seconds to stay closed.
    seconds: float = 0.0
    #: Apply latency or stall after the request took effect (the answer is what is late).
    after: bool = False
    #: body: the request takes effect, and its answer keeps its status and headers (a
    #: rotated refresh token, say) but carries this body instead (a proxy's error page).
    body: str | None = None
    #: How many requests it hits; None until cleared or expired.
    times: int | None = None
    #: trio time at which the rule lapses; None never.
    until: float | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any], now: float) -> Fault:
        """A rule from the control API's JSON; `for` is a duration in seconds."""
        kind = spec.get("kind")
        if kind not in KINDS:
            raise FaultSpecError(f"kind must be one of {', '.join(KINDS)}")
        unknown = set(spec) - {
            "kind",
            "match",
            "status",
            "retry_after",
            "seconds",
            "after",
            "times",
            "for",
            "body",
        }
        if unknown:
            raise FaultSpecError(f"unknown fault fields: {', '.join(sorted(unknown))}")
        duration = spec.get("for")
        try:
            fault = cls(
                kind=kind,
                match=None if spec.get("match") is None else str(spec["match"]),
                status=int(spec.get("status", 503)),
                retry_after=None if spec.get("retry_after") is None else str(spec["retry_after"]),
                seconds=float(spec.get("seconds", 0.0)),
                after=bool(spec.get("after", False)),
                times=None if spec.get("times") is None else int(spec["times"]),
                body=None if spec.get("body") is None else str(spec["body"]),
                until=None if duration is None else now + float(duration),
            )
        except (TypeError, ValueError) as exc:
            raise FaultSpecError(f"bad fault field: {exc}") from None
        if fault.kind == "status" and not 400 <= fault.status <= 599:
            raise FaultSpecError("status must be a 4xx or 5xx code")
        if fault.kind == "body" and fault.body is None:
            raise FaultSpecError("body needs a body")
        if fault.kind == "refuse" and fault.seconds <= 0:
            raise FaultSpecError("refuse needs seconds > 0")
        return fault

    def matches(self, route: str, now: float) -> bool:
        live = self.until is None or now < self.until
        return live and (self.match is None or self.match in route)


class Faults:
    def __init__(self) -> None:
        self.rules: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self.rules.append(fault)

    def clear(self) -> None:
        self.rules.clear()

    def pick(self, route: str, now: float) -> Fault | None:
        """The first live rule for this request, spending one of its `times`."""
        self.rules = [r for r in self.rules if r.until is None or now < r.until]
        for rule in self.rules:
            if rule.kind != "refuse" and rule.matches(route, now):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self.rules.remove(rule)
                return rule
        return None
