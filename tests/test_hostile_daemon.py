"""Issue 9: the daemon attacked as a hostile local user (or a lying upstream) would.

Each test is one attack that worked before its fix. The daemon and the emulator share
one virtual wall clock (MockClock with autojump), so times are asserted exactly;
the attacks that live in the kernel (other uids, signals, FIFOs) use real processes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from broker.emulator.app import Emulator
from broker.emulator.faults import Fault
from broker.session import State
from broker.wallclock import TrioWallClock
from tests.conftest import Broker, Fraction, start_broker

EXACT = {"jitter": 0}


async def exact_broker(
    nursery: trio.Nursery, emulator: Emulator, wall: TrioWallClock, tmp: Path, **settings: object
) -> Broker:
    return await start_broker(
        nursery, emulator, wall, tmp, rng=Fraction(1.0), profile_settings=EXACT, **settings
    )


def refreshes(emulator: Emulator) -> int:
    return emulator.service.counts["GET /login"]


# -- defect 5: an upstream's Retry-After ------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["99999999", "9" * 400])
async def test_a_huge_retry_after_parks_nothing_and_status_stays_finite(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    retry_after: str,
) -> None:
    broker = await exact_broker(nursery, emulator, wall, short_tmp)
    await broker.login()
    session = broker.profile().session
    obtained = session.tokens.obtained_at  # type: ignore[union-attr]
    emulator.server.faults.add(
        Fault("status", match="GET /api", status=429, retry_after=retry_after, times=1)
    )
    await trio.sleep(675.5)
    assert session.failures == 1
    # Capped at the 60-s backoff ceiling (a non-finite value is ignored: plain backoff, 1 s).
    wait = 60.0 if len(retry_after) < 20 else 1.0
    assert session.next_refresh_at == obtained + 675 + wait
    async with broker.client() as client:
        status = await client.status()
    assert all(math.isfinite(p.next_refresh_at or 0) for p in status.profiles)
    await trio.sleep(wait)
    assert session.failures == 0 and session.refreshes == 1
    assert session.last_refresh_at == obtained + 675 + wait
    assert session.state is State.ACTIVE
