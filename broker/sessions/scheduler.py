"""When each profile next has something to do, for all profiles in one task.

A task per profile, asleep until its rotation point, costs a task, a cancel scope and a
wake-up every 30 s for each of possibly ten thousand profiles. Instead the scheduler
keeps one heap of wake-up times and starts a profile's `step` when it is due; between
steps a profile holds no task at all.

Expiry is wall-clock time, scheduling is trio's clock. A suspend (trio's clock stands
still, the wall moves on) or a clock step would make the converted wake-up times wrong,
so the scheduler compares the two clocks at least every `recheck` seconds and, when
they have drifted apart, wakes every profile to look at the wall clock again. (Token
requests check the wall clock themselves, every time, so nothing expired is ever
served in between.)
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import trio

from broker.core.clock import WallClock
from broker.observe.log import events

log = events("broker.scheduler")

#: How far the wall clock may drift from trio's before every profile looks again.
_DRIFT: Final = 1.0
#: When a step failed with a bug, try that profile again this much later.
_RETRY_AFTER_BUG: Final = 60.0


class Steppable(Protocol):
    name: str

    async def step(self) -> None: ...


class Scheduler:
    def __init__(self, wall: WallClock, recheck: float = 30.0) -> None:
        self._wall = wall
        self._recheck = recheck
        self._heap: list[tuple[float, int, Steppable]] = []
        #: The one live entry of each profile; older heap entries are skipped.
        self._current: dict[Steppable, int] = {}
        self._running: set[Steppable] = set()
        self._seq = itertools.count()
        self._earlier = trio.Event()
        self._next_wake = float("inf")

    def at(self, profile: Steppable, wall_time: float) -> None:
        """Step `profile` at `wall_time` (Unix seconds), replacing any earlier plan."""
        when = trio.current_time() + (wall_time - self._wall.now())
        seq = next(self._seq)
        self._current[profile] = seq
        heapq.heappush(self._heap, (when, seq, profile))
        if when < self._next_wake:
            self._earlier.set()

    def now(self, profile: Steppable) -> None:
        self.at(profile, self._wall.now())

    def forget(self, profile: Steppable) -> None:
        self._current.pop(profile, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            wall_mark, trio_mark = self._wall.now(), trio.current_time()
            while True:
                now = trio.current_time()
                if now - trio_mark >= self._recheck:
                    drift = (self._wall.now() - wall_mark) - (now - trio_mark)
                    if abs(drift) > _DRIFT:
                        log.info("clock_jump", seconds=round(drift, 3), profiles=len(self._current))
                        for profile in list(self._current):
                            self.now(profile)
                    wall_mark, trio_mark = self._wall.now(), now
                self._start_due(nursery, now)
                self._next_wake = min(
                    self._heap[0][0] if self._heap else float("inf"), trio_mark + self._recheck
                )
                self._earlier = trio.Event()
                with trio.move_on_at(self._next_wake):
                    await self._earlier.wait()

    def _start_due(self, nursery: trio.Nursery, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, profile = heapq.heappop(heap)
            if self._current.get(profile) != seq:
                continue  # re-planned since, or forgotten
            del self._current[profile]
            if profile in self._running:
                continue  # its step under way plans the next one when it ends
            self._running.add(profile)
            nursery.start_soon(self._step, profile.step, profile, name=f"step:{profile.name}")

    async def _step(self, step: Callable[[], Awaitable[None]], profile: Steppable) -> None:
        try:
            await step()
        except Exception:
            # A bug in one profile's step must not stop every profile's rotation.
            log.exception("step_failed", profile=profile.name)
            self.at(profile, self._wall.now() + _RETRY_AFTER_BUG)
        finally:
            self._running.discard(profile)
