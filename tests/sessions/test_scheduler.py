"""The scheduler: one heap of wake-up times for every profile, robust to bugs and clocks."""

from __future__ import annotations

import trio
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.sessions.scheduler import Scheduler


class Recorder:
    def __init__(
        self, name: str, scheduler: Scheduler, wall: TrioWallClock, fail: bool = False
    ) -> None:
        self.name, self.scheduler, self.wall, self.fail = name, scheduler, wall, fail
        self.steps: list[float] = []

    async def step(self) -> None:
        self.steps.append(trio.current_time())
        if self.fail:
            raise RuntimeError("a bug in a step")
        self.scheduler.at(self, self.wall.now() + 100)


async def test_steps_run_when_due_and_a_failing_one_harms_nobody(
    autojump_clock: MockClock, nursery: trio.Nursery, wall: TrioWallClock
) -> None:
    scheduler = Scheduler(wall, recheck=30)
    await nursery.start(scheduler.run)
    good = Recorder("good", scheduler, wall)
    bad = Recorder("bad", scheduler, wall, fail=True)
    start = trio.current_time()
    scheduler.at(good, wall.now() + 10)
    scheduler.at(bad, wall.now() + 5)
    await trio.sleep(250)
    assert [t - start for t in good.steps] == [10, 110, 210]
    assert [t - start for t in bad.steps] == [5, 65, 125, 185, 245]  # retried every 60 s


async def test_replanning_replaces_and_forget_cancels(
    autojump_clock: MockClock, nursery: trio.Nursery, wall: TrioWallClock
) -> None:
    scheduler = Scheduler(wall)
    await nursery.start(scheduler.run)
    profile = Recorder("p", scheduler, wall)
    start = trio.current_time()
    scheduler.at(profile, wall.now() + 50)
    scheduler.at(profile, wall.now() + 20)  # the later plan wins, even if earlier
    await trio.sleep(60)
    assert [t - start for t in profile.steps] == [20]
    scheduler.forget(profile)
    await trio.sleep(500)
    assert len(profile.steps) == 1


async def test_a_wall_clock_jump_wakes_everyone_within_the_recheck(
    autojump_clock: MockClock, nursery: trio.Nursery, wall: TrioWallClock
) -> None:
    scheduler = Scheduler(wall, recheck=30)
    await nursery.start(scheduler.run)
    sleepers = [Recorder(f"p{i}", scheduler, wall) for i in range(3)]
    for sleeper in sleepers:
        scheduler.at(sleeper, wall.now() + 3600)
    start = trio.current_time()
    wall.step(7200)  # a suspend: the wall moved, trio's clock did not
    await trio.sleep(31)
    assert all(len(s.steps) == 1 and s.steps[0] - start <= 30 for s in sleepers)
