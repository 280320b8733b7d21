"""The process test_store.py kills: rotates sessions through the real store (worker
thread, group commits) and prints each rotation after its commit returned.

Test-only output: the handles (so the test can open the file afterwards) and a digest
of each acknowledged refresh token, never the token.

    python -m tests.customers.crash_child EMULATOR_URL DB KEY_HEX
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import httpx
import trio

from broker.core.sealing import Key, Keyring
from broker.core.secret import Secret
from broker.customers.manager import CustomerSessions
from broker.customers.model.app import AppSettings
from broker.customers.model.lifetime import Lifetime
from broker.customers.model.ratelimit import LoginRates, Rate
from broker.customers.store import CustomerStore
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from broker.geins.protocol import Endpoint

SESSIONS = 8


async def main(url: str, db: Path, key: bytes) -> None:
    keyring = Keyring(Key(key))
    endpoint = Endpoint("demo", "demo-api-key", auth_service_url=url, merchant_api_url=url)
    app = AppSettings(
        "crash",
        endpoint,
        lifetime=Lifetime(max_per_customer=SESSIONS),
        rates=LoginRates(Rate(100, 100), Rate(100, 100)),
    )
    async with httpx.AsyncClient() as http, trio.open_nursery() as nursery:
        manager = CustomerSessions({"crash": app}, CustomerStore(db, keyring), keyring, http=http)
        await nursery.start(manager.run)
        lives = []
        for index in range(SESSIONS):
            created = await manager.login(
                "crash", 0, DEMO_USER, Secret(DEMO_PASSWORD), remember=True
            )
            print("handle", index, created.handle.reveal(), flush=True)
            live = manager.lives.peek(manager.store.store_key.session_id("crash", created.handle))
            assert live is not None
            lives.append(live)

        async def rotate(index: int) -> None:
            live = lives[index]
            while True:
                await manager.refresher.refresh(live)
                digest = hashlib.sha256(live.refresh.reveal().encode()).hexdigest()
                print("ack", index, live.generation, digest, flush=True)

        for index in range(SESSIONS):
            nursery.start_soon(rotate, index)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], Path(sys.argv[2]), bytes.fromhex(sys.argv[3]))
