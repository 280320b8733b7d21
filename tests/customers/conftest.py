"""Customer sessions in-process: the manager against the in-process emulator, under
MockClock, with the store's blocking calls run in place (tests/support.py's `inline`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from broker.core.clock import TrioWallClock
from broker.core.sealing import Key, Keyring
from broker.customers.manager import CustomerSessions
from broker.customers.model.app import AppSettings
from broker.customers.model.lifetime import Lifetime
from broker.customers.store import CustomerStore
from broker.emulator.app import Emulator
from broker.policy.session import Policy
from tests.support import Fraction, inline

Start = Callable[..., Awaitable[CustomerSessions]]


@pytest.fixture
def keyring() -> Keyring:
    return Keyring(Key.generate())


@pytest.fixture
def start_customers(
    wall: TrioWallClock,
    emulator: Emulator,
    nursery: trio.Nursery,
    http: httpx.AsyncClient,
    short_tmp: Path,
    keyring: Keyring,
) -> Start:
    """Start a manager with one app per name in `apps` (default "shop"); `lifetime`
    and the other AppSettings fields as keywords. No jitter: exact virtual times."""

    async def start(
        apps: tuple[str, ...] = ("shop",),
        path: Path | None = None,
        **settings: Any,
    ) -> CustomerSessions:
        settings.setdefault("policy", Policy(jitter=0))
        settings.setdefault("lifetime", Lifetime())
        store = CustomerStore(path or short_tmp / "customers.sqlite", keyring, offload=inline)
        manager = CustomerSessions(
            {name: AppSettings(name, emulator.endpoint(), **settings) for name in apps},
            store,
            keyring,
            http=http,
            wall=wall,
            rng=Fraction(1.0),
        )
        await nursery.start(manager.run)
        return manager

    return start
