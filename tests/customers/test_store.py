"""The store: what a copy of its file gives away, and crashes during group commits."""

from __future__ import annotations

import base64
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from broker.core.sealing import Keyring
from broker.core.secret import Secret
from broker.customers.model import record as records
from broker.customers.model.errors import RecordUnreadable
from broker.customers.model.handles import session_key
from broker.customers.store import TOUCH_WINDOW, CustomerStore, Row
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from tests.customers.conftest import Start
from tests.support import REPO, EmulatorProcess, inline, running


def _raw(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


async def test_a_dump_of_the_store_with_the_daemons_key_opens_no_session(
    autojump_clock: trio.testing.MockClock,
    start_customers: Start,
    keyring: Keyring,
    short_tmp: Path,
) -> None:
    path = short_tmp / "customers.sqlite"
    manager = await start_customers(path=path)
    secrets_seen: list[bytes] = []
    handles = []
    for _ in range(5):
        created = await manager.login("shop", 1000, DEMO_USER, Secret(DEMO_PASSWORD), remember=True)
        served = await manager.token("shop", created.handle)
        live = manager.lives.peek(manager.store.store_key.session_id("shop", created.handle))
        assert live is not None
        handles.append(created.handle)
        secrets_seen += [created.handle.reveal().encode(), served.token.reveal().encode()]
        secrets_seen.append(live.refresh.reveal().encode())
    raw = _raw(path)
    assert raw
    for secret in [*secrets_seen, DEMO_USER.encode()]:
        assert secret not in raw
        assert base64.b64encode(secret) not in raw

    # An attacker's copy, opened with the daemon's keyring: every id, the store key and
    # the outer seals open; no record does, under any key the file and keyring give.
    copy = short_tmp / "copy"
    copy.mkdir(mode=0o700)
    for part in path.parent.glob(path.name + "*"):
        shutil.copy(part, copy / part.name)
    stolen = CustomerStore(copy / path.name, keyring, offload=inline)
    rows = await stolen.listing("shop", 100)
    assert len(rows) == 5
    for row in rows:
        guesses = [row.session_id, stolen.store_key.material, row.customer_id, bytes(32)]
        for guess in guesses:
            try:
                records.open_record(row.record, keyring, "shop", row.session_id, guess)
            except RecordUnreadable:
                continue
            raise AssertionError("a record opened without its handle")
    # With the handles (which live only in customers' cookies) they do.
    for handle in handles:
        found = await stolen.get("shop", stolen.store_key.session_id("shop", handle))
        assert found is not None
        opened, _ = records.open_record(
            found.record, keyring, "shop", found.session_id, session_key("shop", handle)
        )
        assert opened.username == DEMO_USER
    stolen.close()


def test_kill_9_during_group_commits_loses_no_acknowledged_rotation(short_tmp: Path) -> None:
    """A real daemon-like process rotates 8 sessions as fast as the emulator lets it,
    printing each rotation once its commit returned; it is killed -9 mid-stream. Every
    acknowledged rotation is in the file afterwards (the same generation and refresh
    token, or a later one)."""
    emulator = EmulatorProcess()
    key = os.urandom(32)
    db = short_tmp / "customers.sqlite"
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.customers.crash_child", emulator.url, str(db), key.hex()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    assert child.stdout is not None
    handles: dict[str, str] = {}
    acked: dict[str, tuple[int, str]] = {}
    with running(emulator):
        try:
            deadline = time.monotonic() + 20
            while len(acked) < 8 or sum(g for g, _ in acked.values()) < 200:
                assert time.monotonic() < deadline, child.stderr.read1().decode()  # type: ignore[union-attr]
                ready, _, _ = select.select([child.stdout], [], [], 5)
                assert ready, "the child is silent"
                kind, index, *rest = child.stdout.readline().decode().split()
                if kind == "handle":
                    handles[index] = rest[0]
                else:
                    acked[index] = (int(rest[0]), rest[1])
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=10)
            child.stdout.close()
            assert child.stderr is not None
            child.stderr.close()
    from broker.core.sealing import Key

    keyring = Keyring(Key(key))
    store = CustomerStore(db, keyring, offload=inline)

    async def check() -> None:
        for index, handle_text in handles.items():
            handle = Secret(handle_text)
            row = await store.get("crash", store.store_key.session_id("crash", handle))
            assert row is not None
            record, _ = records.open_record(
                row.record, keyring, "crash", row.session_id, session_key("crash", handle)
            )
            generation, digest = acked.get(index, (1, ""))
            assert record.generation >= generation
            if record.generation == generation and digest:
                assert hashlib.sha256(record.refresh.reveal().encode()).hexdigest() == digest

    trio.run(check)
    store.close()


def _row(index: int) -> Row:
    return Row(
        session_id=index.to_bytes(32, "big"),
        app="shop",
        customer_id=b"c" * 32,
        name=b"n",
        remember=True,
        created_at=0.0,
        last_used_at=0.0,
        ends_at=None,
        record=b"r",
    )


async def test_a_commit_goes_at_once_and_last_uses_alone_wait_for_a_window(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, short_tmp: Path
) -> None:
    """A rotated record is on disk the moment it is queued (its old refresh token is
    spent); last-use times, which hold no secret, wait up to TOUCH_WINDOW for company
    and then go in one group, or sooner with the next commit."""
    store = CustomerStore(short_tmp / "customers.sqlite", Keyring(), offload=inline)
    await nursery.start(store.run)
    at = trio.current_time()
    await store.commit(_row(0))
    assert trio.current_time() == at and store.stats.commits == 1

    for index in range(10):
        store.touch("shop", _row(0).session_id, float(index))
        await trio.sleep(0.01)
    assert store.stats.commits == 1  # 0.1 s: the window is still open
    await trio.sleep(TOUCH_WINDOW - 0.1 + 0.01)  # the window opened by the first
    assert store.stats.commits == 2 and store.stats.rows == 11  # one group of ten

    store.touch("shop", _row(0).session_id, 20.0)
    await trio.sleep(0.01)
    at = trio.current_time()
    await store.commit(_row(1))  # takes the waiting last use along, at once
    assert trio.current_time() == at and store.stats.commits == 3
    assert store.stats.rows == 13
    store.close()


async def test_commits_queued_during_a_group_share_the_next(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery, short_tmp: Path
) -> None:
    """A steady stream of rotations, 50 ms per fsync: none waits for a window, and
    those that arrive while a group is written share the next group's fsync."""
    store = CustomerStore(short_tmp / "customers.sqlite", Keyring(), offload=_slow_inline)
    await nursery.start(store.run)
    latencies: list[float] = []

    async def rotation(index: int) -> None:
        await trio.sleep(index * 0.01)
        at = trio.current_time()
        await store.commit(_row(index))
        latencies.append(trio.current_time() - at)

    async with trio.open_nursery() as rotations:
        for index in range(100):  # 100 rotations over 1 s
            rotations.start_soon(rotation, index)
    assert store.stats.rows == 100
    assert store.stats.commits <= 21  # one per fsync's time, not one per rotation
    assert max(latencies) <= 0.1 + 1e-9  # the fsync under way, then its own


async def _slow_inline(fn: Any, *args: Any) -> Any:
    await trio.sleep(0.05)
    return fn(*args)
