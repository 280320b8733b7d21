"""A lying Geins: answers the daemon must survive without parking, dying or serving what
cannot be used (a huge Retry-After, garbage bodies, absurd or giant JWTs).

The daemon and the emulator share one virtual wall clock (MockClock with autojump), so
times are asserted exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.policy.session import State
from geins_broker_client.errors import UpstreamError
from tests.hostile.support import forged_jwt
from tests.support import (
    DEMO_PASSWORD,
    exact_broker,
)

# -- an upstream's Retry-After ----------------------------------------------------------------


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


# -- answers that rotate but cannot be used (garbage, absurd times, giant bearers) ----------


T = 1_800_000_675  # about when the first rotation happens (TrioWallClock starts at 1.8e9)
UNUSABLE_BODIES = {
    "html error page": "<html><body>502 Bad Gateway</body></html>",
    "exp overflows": json.dumps({"token": forged_jwt(exp=1e300, iat=T), "maxAge": 1800}),
    "exp is 400 digits": json.dumps(
        {"token": forged_jwt(exp=int("9" * 400), iat=T), "maxAge": 1800}
    ),
    "negative times": json.dumps({"token": forged_jwt(exp=-1, iat=-61), "maxAge": 1800}),
    "lives ten years": json.dumps({"token": forged_jwt(exp=T + 10 * 366 * 86400, iat=T)}),
    # The clock-skew rule: exp in 1970 with exp - iat = 60 was served for 60 s.
    "issued in 1970": json.dumps({"token": forged_jwt(exp=60, iat=0), "maxAge": 1800}),
    # A giant bearer is copied into every answer (5 MB: 1.47 GB RSS); 64 KiB is the most taken.
    "bearer of 100 KiB": json.dumps(
        {"token": forged_jwt(exp=T + 900, iat=T, pad="x" * 100_000), "maxAge": 1800}
    ),
}


@pytest.mark.parametrize("body", list(UNUSABLE_BODIES.values()), ids=list(UNUSABLE_BODIES))
async def test_a_rotated_refresh_token_survives_an_unusable_answer(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    body: str,
) -> None:
    """Geins rotates the refresh token (the header) but the body is unusable: the new
    refresh token is kept (the old one is spent) and the old bearer served; the next
    refresh works. Before, the new token was dropped and the session died."""
    broker = await exact_broker(nursery, emulator, wall, short_tmp)
    await broker.login()
    session = broker.profile().session
    before = session.tokens
    assert before is not None
    emulator.server.faults.add(Fault("body", match="GET /api", body=body, times=1))
    await trio.sleep(675.5)
    assert session.failures == 1 and session.refreshes == 0
    assert session.state is State.DEGRADED
    held = session.tokens
    assert held is not None and held.bearer == before.bearer
    assert held.expires_at == before.expires_at
    assert held.refresh is not None and held.refresh != before.refresh
    assert emulator.service.inspect_refresh(held.refresh.reveal())["state"] == "current"
    async with broker.client() as client:
        token = await client.token()
    assert token.token == before.bearer.reveal()
    await trio.sleep(1)  # the first retry (backoff 1 s at the top of its jitter)
    state_now: State = session.state  # read again: mypy keeps the earlier assert's narrowing
    assert session.refreshes == 1 and state_now is State.ACTIVE
    assert session.last_refresh_at == before.obtained_at + 676


async def test_a_password_change_keeps_the_new_refresh_token_of_an_unusable_answer(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """A password change voids the old tokens: if its answer is unusable, the refresh
    token in its header is the only way on, and is kept."""
    broker = await exact_broker(nursery, emulator, wall, short_tmp)
    await broker.login()
    session = broker.profile().session
    before = session.tokens
    assert before is not None
    emulator.server.faults.add(
        Fault("body", match="POST /api/demo_prod/password", body="<html>502</html>", times=1)
    )
    async with broker.client() as client:
        with pytest.raises(UpstreamError):
            await client.change_password(DEMO_PASSWORD, "new-password")
    held = session.tokens
    assert held is not None and held.refresh is not None and held.refresh != before.refresh
    assert emulator.service.inspect_refresh(held.refresh.reveal())["state"] == "current"
    async with broker.client() as client:
        await client.refresh()  # the kept token works
    assert session.state is State.ACTIVE
