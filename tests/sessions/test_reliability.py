"""Faults upstream, on disk and from hostile clients: the daemon keeps its promises.

In-process under MockClock wherever the behaviour allows, so minutes of outage take
milliseconds; the memory check runs the daemon as a real process.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from broker.policy.session import State
from geins_broker_client.protocol import encode
from tests.support import (
    Broker,
    DaemonProcess,
    EmulatorProcess,
    Fraction,
    RawConnection,
    call,
    remount,
    start_broker,
    write_config,
)

# -- upstream faults ------------------------------------------------------------------------

FAULTS = {
    "refused": lambda server: server.refuse(300),
    "5xx": lambda server: server.faults.add(Fault("status", status=503, match="GET /api")),
    "429 + Retry-After": lambda server: server.faults.add(
        Fault("status", status=429, retry_after="20", match="GET /api")
    ),
    "latency beyond the timeout": lambda server: server.faults.add(
        Fault("latency", seconds=11, match="GET /api")
    ),
    "stall": lambda server: server.faults.add(Fault("stall", match="GET /api")),
}


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_transient_faults_degrade_serve_back_off_and_recover(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    fault: str,
) -> None:
    broker = await start_broker(
        nursery, emulator, wall, short_tmp, rng=Fraction(1.0), profile_settings={"jitter": 0}
    )
    await broker.login()
    session = broker.profile().session
    first_token = session.tokens.bearer.reveal()  # type: ignore[union-attr]
    await trio.sleep(600)
    FAULTS[fault](emulator.server)
    await trio.sleep(75 + 60)  # the rotation point, then about a minute of failures
    attempts = session.failures
    assert session.state is State.DEGRADED
    assert 2 <= attempts <= 8  # backing off, not hammering
    assert session.last_error
    async with broker.client() as client:
        served = await client.token()
        status = (await client.status()).profiles[0]
    assert served.token == first_token
    assert served.expires_in(wall.now()) > 0
    assert (status.state, status.failures) == ("degraded", attempts)
    emulator.server.clear_faults()
    await trio.sleep(61)  # the next retry is at most 60 s away
    state_now: State = session.state  # read again: mypy keeps the earlier assert's narrowing
    assert state_now is State.ACTIVE
    assert session.tokens.bearer.reveal() != first_token  # type: ignore[union-attr]


async def test_revoked_session_needs_a_login_and_says_so(
    autojump_clock: MockClock, broker: Broker
) -> None:
    await broker.login()
    broker.emulator.service.revoke_user(DEMO_USER)
    await trio.sleep(900)
    async with broker.client() as client:
        status = (await client.status()).profiles[0]
    assert status.state == "login_required"
    assert "log in" in (status.last_error or "")


# -- disk faults ----------------------------------------------------------------------------


async def test_read_only_state_directory_keeps_serving_and_recovers(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    tmpfs: Path,
) -> None:
    broker = await start_broker(
        nursery,
        emulator,
        wall,
        short_tmp,
        state_dir=tmpfs / "state",
        profile_settings={"jitter": 0},
    )
    await broker.login()
    # Blocking on purpose: under MockClock a trio.run_process wait would let time jump.
    remount(tmpfs, "ro")
    await trio.sleep(676)
    session = broker.profile().session
    assert session.state is State.DEGRADED
    assert "Read-only" in (session.store_error or "")
    async with broker.client() as client:
        assert (await client.token()).token == session.tokens.bearer.reveal()  # type: ignore[union-attr]
    remount(tmpfs, "rw")
    await trio.sleep(64)
    state_now: State = session.state  # read again: mypy keeps the earlier assert's narrowing
    assert state_now is State.ACTIVE
    saved = (tmpfs / "state" / "default.session.json").read_text()
    assert session.tokens.refresh.reveal() in saved  # type: ignore[union-attr]


# -- hostile clients ------------------------------------------------------------------------


_FUZZ: dict[str, Any] = {}


async def _fuzz_one(data: bytes, chunk: int) -> None:
    broker: Broker = _FUZZ["broker"]
    conn = await RawConnection.open(broker.socket)
    try:
        for i in range(0, len(data), chunk):
            await conn.send(data[i : i + chunk])
        await conn.sock.send(encode({"id": 999_999, "op": "hello"}))
        with trio.move_on_after(1):
            while (answer := await conn.receive()) is not None:
                assert set(answer) >= {"id", "ok"}
                if answer["ok"] is False:
                    assert answer["error"]["code"] in {
                        "bad_frame",
                        "bad_request",
                        "unknown_op",
                        "unknown_profile",
                        "not_logged_in",
                        "invalid_credentials",
                        "forbidden",
                        "busy",
                        "upstream_unavailable",
                        "timeout",
                        "upstream_error",
                        "login_required",
                    }
                if answer["id"] == 999_999 and answer.get("v") == 1:
                    break
    except OSError:
        pass  # closed on us after a bad frame: documented
    finally:
        conn.close()
    good = await RawConnection.open(broker.socket)
    assert (await good.call(id=1, op="hello"))["ok"]
    good.close()


@pytest.fixture
async def fuzz_target(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> Broker:
    broker = await start_broker(nursery, emulator, wall, short_tmp)
    _FUZZ["broker"] = broker
    return broker


async def test_fuzzed_frames(autojump_clock: MockClock, fuzz_target: Broker) -> None:
    """Hypothesis drives the socket from inside the running trio test."""
    examples: list[tuple[bytes, int]] = []

    @settings(
        max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(
        st.one_of(
            st.binary(max_size=120),
            st.builds(
                lambda body: struct.pack(">I", len(body)) + body,
                st.binary(max_size=80),
            ),
            st.builds(
                encode,
                st.dictionaries(
                    st.sampled_from(
                        ["id", "op", "profile", "min_valid", "username", "password", "v", "x"]
                    ),
                    st.one_of(
                        st.none(),
                        st.booleans(),
                        st.integers(-5, 2**40),
                        st.floats(allow_nan=True),
                        st.text(max_size=10),
                        st.sampled_from(["token", "hello", "status", "user", "login"]),
                        st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
                        st.binary(max_size=5),
                    ),
                    max_size=6,
                ),
            ),
        ),
        st.integers(1, 64),
    )
    def collect(data: bytes, chunk: int) -> None:
        examples.append((data, chunk))

    collect()
    assert len(examples) >= 1000
    for data, chunk in examples:
        await _fuzz_one(data, chunk)


async def test_deeply_nested_and_oversized(autojump_clock: MockClock, broker: Broker) -> None:
    deep = b"\x81\xa2id\x01" + b"\x81\xa1a" * 3000 + b"\xc0"
    conn = await RawConnection.open(broker.socket)
    await conn.send(struct.pack(">I", len(deep)) + deep)
    answer = await conn.receive()
    assert answer is not None and answer["error"]["code"] == "bad_frame"
    conn.close()
    nested_value = msgpack.packb(
        {
            "id": 2,
            "op": "register",
            "username": "x@y",
            "password": "p",
            "user": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": {}}}}}}}}}},
        }
    )
    conn = await RawConnection.open(broker.socket)
    await conn.send(struct.pack(">I", len(nested_value)) + nested_value)
    answer = await conn.receive()
    assert answer is not None and answer["error"]["code"] == "bad_request"
    conn.close()


async def test_a_flood_of_connections_past_the_limit(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(nursery, emulator, wall, short_tmp, max_connections=50)
    await broker.login()
    flood = [await RawConnection.open(broker.socket) for _ in range(200)]
    busy = 0
    for conn in flood[50:]:
        answer = await conn.receive()
        busy += answer is not None and answer["error"]["code"] == "busy"
    assert busy == 150
    for conn in flood:
        conn.close()
    await trio.sleep(0.1)
    good = await RawConnection.open(broker.socket)
    assert (await good.call(id=1, op="token"))["ok"]
    good.close()


def test_memory_stays_bounded_under_hostile_clients(short_tmp: Path) -> None:
    """A real daemon: stalled half frames, greedy unread pipelines, floods, garbage.
    Its RSS afterwards stays within a few MiB of where it started."""
    emulator = EmulatorProcess()
    sock = short_tmp / "b.sock"
    config = write_config(
        short_tmp / "c.toml",
        emulator.url,
        sock,
        short_tmp / "state",
        broker={"max_connections": 300, "frame_timeout": 1, "send_timeout": 1},
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        assert call(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD)["ok"]
        before = _rss_mib(daemon.process.pid)
        for _ in range(3):
            clients = []
            for i in range(280):
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.connect(str(sock))
                if i % 4 == 0:
                    client.send(struct.pack(">I", 60000) + b"\x81" * 1000)  # half a big frame
                elif i % 4 == 1:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    client.setblocking(False)
                    try:
                        for _ in range(200):
                            client.send(encode({"id": 1, "op": "token"}) * 100)
                    except BlockingIOError:
                        pass
                elif i % 4 == 2:
                    client.send(os.urandom(300))
                clients.append(client)
            assert call(sock, op="token")["ok"]  # a good client is served throughout
            time.sleep(1.5)  # frame and send timeouts close the stalled and the greedy
            for client in clients:
                client.close()
        time.sleep(0.5)
        after = _rss_mib(daemon.process.pid)
        assert call(sock, op="status")["ok"]
        print(
            f"RSS before {before:.1f} MiB, after three waves of 280 hostile clients {after:.1f} MiB"
        )
        assert after - before < 20, (before, after)
    finally:
        assert daemon.stop() == 0
        emulator.stop()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
