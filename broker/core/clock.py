"""Wall-clock time, injectable.

Token expiry is wall-clock time (Unix seconds, the JWT's `exp`), while trio schedules
on its own monotonic clock. Everything that asks "what time is it" for expiry goes
through a `WallClock`, so tests can run it off trio's MockClock and step it to mimic a
suspend and resume or an NTP correction.
"""

from __future__ import annotations

import time
from typing import Protocol


class WallClock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    __slots__ = ()

    def now(self) -> float:
        return time.time()


class OffsetClock:
    """The system's clock off by `offset` seconds: a node whose clock is skewed."""

    __slots__ = ("offset",)

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset


class TrioWallClock:
    """Wall time that advances with trio's clock (MockClock in tests), plus steps.

    `step(seconds)` jumps the wall clock without moving trio's: what a laptop sees after
    a suspend (monotonic time stood still) or an NTP step.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        import trio

        self._trio = trio
        self._offset = start - trio.current_time()

    def now(self) -> float:
        return self._trio.current_time() + self._offset

    def step(self, seconds: float) -> None:
        self._offset += seconds
