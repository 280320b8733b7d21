"""Resident memory per live customer session, in memory as the manager holds them.

Builds N `Live` sessions (an emulator-minted JWT, a refresh token, the session key)
in a `LiveMap`, as after N logins, and reports the growth of resident memory per
session. The goal is at most 2 KiB per live session (Keycloak documents about 5 KB).
The store adds nothing resident per session (SQLite's page cache is bounded).

    .venv/bin/python -m benchmarks.customer_memory [N]
"""

from __future__ import annotations

import gc
import secrets
import sys

from broker.core.secret import Secret
from broker.customers.live import Live, LiveMap
from broker.customers.model.handles import StoreKey, new_handle
from broker.customers.model.record import SessionRecord
from broker.emulator.model import jwt


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main(count: int = 100_000) -> None:
    key, store_key = secrets.token_bytes(32), StoreKey.generate()
    lives = LiveMap(count)
    gc.collect()
    before = rss_kib()
    for index in range(count):
        username = f"customer{index}@example.com"
        claims = jwt.geins_claims(
            user_id=str(1000 + index),
            username=username,
            customer_type="PERSON",
            issued_at=1_800_000_000,
            expires_at=1_800_000_900,
            token_id=f"{secrets.token_hex(8)}.0",
            issuer="https://auth-service.geins.io",
            audience="demo",
        )
        handle = new_handle()
        record = SessionRecord(
            app="shop",
            username=username,
            remember=True,
            bearer=Secret(jwt.mint(claims, key)),
            refresh=Secret(secrets.token_urlsafe(32)),
            obtained_at=1_800_000_000.0,
            expires_at=1_800_000_900.0,
            session_ends_at=1_800_604_800.0,
            created_at=1_800_000_000.0,
            generation=1,
            committed_at=1_800_000_000.0,
        )
        lives.put(
            Live(
                store_key.session_id("shop", handle),
                handle.reveal(),
                record,
                1_800_000_000.0,
            )
        )
    gc.collect()
    grown = rss_kib() - before
    bearer = len(record.bearer.reveal())
    print(f"sessions={count} rss_growth_kib={grown} per_session_bytes={grown * 1024 / count:.0f}")
    print(f"bearer_bytes={bearer} goal_per_session_bytes=2048")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
