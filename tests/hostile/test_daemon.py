"""Issue 9: the daemon attacked as a hostile local user (or a lying upstream) would.

Each test is one attack that worked before its fix. The daemon and the emulator share
one virtual wall clock (MockClock with autojump), so times are asserted exactly;
the attacks that live in the kernel (other uids, signals, FIFOs) use real processes.
"""

from __future__ import annotations

import base64
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.core.errors import Busy
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.policy.session import State
from broker.rpc.connection import Connection
from broker.rpc.peercred import Peer
from geins_broker_client.errors import ProtocolError, UpstreamError
from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    NOBODY,
    READER,
    Broker,
    DaemonProcess,
    EmulatorProcess,
    RawConnection,
    call,
    exact_broker,
    python_as,
    refreshes,
    start_broker,
    write_config,
)

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


# -- defect 3: a refresh storm by a reader -------------------------------------------------


class TickingWall(TrioWallClock):
    """Wall time that moves on a millisecond each time it is read, as real time does
    between receiving a token and checking it: a fresh token never has quite its
    whole lifetime left."""

    def __init__(self) -> None:
        super().__init__()
        self._ticks = 0.0

    def now(self) -> float:
        self._ticks += 0.001
        return super().now() + self._ticks


async def test_a_token_request_causes_at_most_one_refresh(
    autojump_clock: MockClock, nursery: trio.Nursery, emulator: Emulator, short_tmp: Path
) -> None:
    """min_valid just under the lifetime: every refresh succeeds and still does not
    satisfy it. One request made ~11,000 refreshes in 15 s; now one, then an error."""
    broker = await start_broker(nursery, emulator, TickingWall(), short_tmp)
    await broker.login()
    before = refreshes(emulator)

    async def stop_a_storm(scope: trio.CancelScope) -> None:
        # Under MockClock a storm never lets virtual time reach token_wait (every task
        # is always busy): without this guard the unfixed daemon hangs the test.
        while refreshes(emulator) <= before + 5:
            await trio.lowlevel.checkpoint()
        scope.cancel()

    async with trio.open_nursery() as guard, broker.client() as client:
        guard.start_soon(stop_a_storm, guard.cancel_scope)
        with pytest.raises(ProtocolError) as info:
            await client.token(min_valid=899.9999)
        guard.cancel_scope.cancel()
    assert refreshes(emulator) == before + 1
    assert info.value.code == "bad_request"
    assert "more than even a fresh token has" in str(info.value)
    assert broker.profile().session.state is State.ACTIVE


async def test_a_reader_may_cause_one_refresh_per_interval(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await exact_broker(nursery, emulator, wall, short_tmp, token_wait=5)
    await broker.login()
    profile = broker.profile()
    session = profile.session
    await trio.sleep(100)
    before = refreshes(emulator)
    await profile.ensure_token(850, reader=True)  # 800 s left: one refresh
    assert refreshes(emulator) == before + 1
    refreshed_at = session.last_refresh_at
    await trio.sleep(60)  # 840 s left: the reader may cause another refresh now
    await profile.ensure_token(850, reader=True)
    assert refreshes(emulator) == before + 2
    await trio.sleep(20)  # within 30 s of that one: not before it is 30 s old
    with pytest.raises(Busy, match="try again in 10 s"):
        await profile.ensure_token(890, reader=True)
    assert refreshes(emulator) == before + 2
    await profile.ensure_token(890)  # root is not held back
    assert refreshes(emulator) == before + 3
    assert session.last_refresh_at == refreshed_at + 80


# -- defects 6 and 8, and the clock-skew rule: answers that rotate but cannot be used --------


def forged_jwt(**claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(claims)}.c2ln"


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
    # Defect 8: a 5 MB bearer was copied into every answer; 64 KiB is the most taken.
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
    assert session.refreshes == 1 and session.state is State.ACTIVE
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


# -- defect 4: answers a client leaves unread ----------------------------------------------


def unread(broker: Broker) -> int:
    server = broker.daemon.server
    assert server is not None
    return sum(len(conn.out) for conn in server._connections.values())


@pytest.mark.parametrize(
    "bounds",
    [{"max_unread_bytes": 65536}, {"max_unread_total": 65536}],
    ids=["per connection", "in total"],
)
async def test_unread_watch_streams_are_bounded_and_the_connection_closed(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    bounds: dict[str, int],
) -> None:
    """32 watches on one connection, never read, while the token rotates: the queued
    events grew without bound (300 such connections: +400 MB). Now the connection is
    closed once 64 KiB are queued, counted, and the others are served."""
    broker = await exact_broker(nursery, emulator, wall, short_tmp, **bounds)
    await broker.login()
    hog = await RawConnection.open(broker.socket)
    for request_id in range(32):
        await hog.request(id=request_id, op="watch")
    await trio.sleep(1)
    server = broker.daemon.server
    assert server is not None
    profile = broker.profile()
    for _ in range(60):  # 32 events of ~1 KB per rotation; the kernel holds ~200 KB
        await profile.refresh_now()
        assert unread(broker) <= 65536
    assert server.admission.overflows == 1
    assert server.admission.unread == unread(broker) == 0
    while await hog.receive() is not None:  # what the kernel held, then the end
        pass
    hog.close()
    async with broker.client() as client:
        assert (await client.token()).token


async def test_the_total_bound_closes_the_hog_not_a_slow_reader(
    autojump_clock: MockClock, broker: Broker
) -> None:
    """Found attacking the fix: past max_unread_total, whoever wrote next was closed,
    so one reader's hog of unread watches got another, merely slow, reader closed.
    Now the connection holding the most unread goes."""
    server = broker.daemon.server
    assert server is not None
    server.admission.configure(replace(server.limits, max_unread_total=100_000))
    pairs = [socket.socketpair() for _ in range(2)]
    hog, slow = (
        Connection(ours, Peer(pid, 1000 + pid, 1000), trio.current_time())
        for pid, (ours, _) in enumerate(pairs)
    )
    for conn, unread_bytes in ((hog, 90_000), (slow, 5_000)):
        server._connections[conn.fd] = conn
        server._epoll.register(conn.fd, select.EPOLLOUT)
        conn.out += b"x" * unread_bytes
        server.admission.unread += unread_bytes
    server.write(slow, b"y" * 10_000)
    assert hog.closed and not slow.closed
    assert len(slow.out) == 15_000 and server.admission.unread == 15_000
    assert server.admission.overflows == 1
    server.write(slow, b"z" * 90_000)  # now the slow one is the biggest: it goes
    assert slow.closed and server.admission.unread == 0 and server.admission.overflows == 2
    for _, theirs in pairs:
        theirs.close()


async def test_pipelined_big_answers_are_written_in_parts(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """Defect 8: 64 pipelined requests whose answers are 60 KiB each were joined into
    one 3.8 MB write and queued whole. Now at most 256 KiB are joined, and what the
    client does not read stays unanswered until it does."""
    broker = await exact_broker(nursery, emulator, wall, short_tmp)
    await broker.login()
    now = int(wall.now())
    big = forged_jwt(exp=now + 900, iat=now, pad="x" * 45_000)
    emulator.server.faults.add(
        Fault("body", match="GET /api", body=json.dumps({"token": big, "maxAge": 1800}), times=1)
    )
    await broker.profile().refresh_now()
    hog = await RawConnection.open(broker.socket)
    await hog.send(b"".join(encode({"id": i, "op": "token"}) for i in range(64)))
    await trio.sleep(1)
    assert unread(broker) < 256 * 1024 + len(big) + 100
    answers = [await hog.receive() for _ in range(64)]
    assert [a["id"] for a in answers if a is not None] == list(range(64))
    assert all(a is not None and a["token"] == big for a in answers)
    hog.close()


# -- defect 7: a stranger's flood of connections, with real uids ------------------------------

#: Run as another uid: open
#: argv[2] connections, report how many the daemon kept, hold them until stdin closes,
#: then report how many the daemon has closed meanwhile (bounded wait).
_FLOOD = """
import socket, sys, time
kept, refused = [], 0
for _ in range(int(sys.argv[2])):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(sys.argv[1])
    # A refused connection gets its busy frame and the close at once: our hello may
    # meet a closed socket (EPIPE) or a reset, and that is a refusal too.
    try:
        sock.sendall(bytes.fromhex(sys.argv[3]))
    except OSError:
        pass
    try:
        answer = sock.recv(65536)  # hello's answer, or the busy frame
    except OSError:
        answer = b""
    if b"busy" in answer or not answer:
        refused += 1
        sock.close()
    else:
        kept.append(sock)
print(len(kept), refused, flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 15
closed = 0
for sock in kept:
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        closed += sock.recv(1) == b""
    except OSError:
        pass
print(closed, flush=True)
"""

_AS_READER = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
sys.stdout.write(sock.recv(65536).hex())
"""


def script_as(uid: int, script: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        python_as(uid, "-c", script, *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture
def open_tmp(short_tmp: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o755)
    return short_tmp


@pytest.fixture
def emulator_process() -> Iterator[EmulatorProcess]:
    process = EmulatorProcess()
    try:
        yield process
    finally:
        assert process.stop() == 0


def test_a_strangers_flood_locks_out_neither_root_nor_a_reader(
    emulator_process: EmulatorProcess, open_tmp: Path
) -> None:
    """A uid that may read nothing held every connection slot, and root got `busy`.
    Now it gets at most max_connections_per_uid, the last slots are root's, and its
    idle connections are closed after stranger_idle_timeout."""
    sock = open_tmp / "b.sock"
    config = write_config(
        open_tmp / "c.toml",
        emulator_process.url,
        sock,
        open_tmp / "state",
        broker={
            "socket_mode": "0666",
            "max_connections": 16,
            "max_connections_per_uid": 8,
            "admin_reserved_connections": 4,
            "stranger_idle_timeout": 1,
        },
        profile={"allow_users": [READER]},
    )
    daemon = DaemonProcess(config, open_tmp)
    hello = encode({"id": 1, "op": "hello"}).hex()
    flood = script_as(NOBODY, _FLOOD, str(sock), "16", hello)
    try:
        login = call(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD)
        assert login["ok"], login
        assert flood.stdout is not None and flood.stdin is not None
        kept, refused = map(int, flood.stdout.readline().split())
        assert (kept, refused) == (8, 8)
        assert call(sock, op="status")["ok"]  # root
        reader = script_as(READER, _AS_READER, str(sock), encode({"id": 1, "op": "token"}).hex())
        out, _ = reader.communicate(timeout=20)
        (answer,) = FrameDecoder(MAX_RESPONSE_SIZE).feed(bytes.fromhex(out))
        assert answer["ok"] and answer["token"] == call(sock, op="token")["token"]
        flood.stdin.write("\n")
        flood.stdin.flush()
        assert int(flood.stdout.readline()) == 8  # closed by the daemon, idle
    finally:
        flood.kill()
        flood.communicate(timeout=10)
        daemon.close()


async def test_a_strangers_connection_is_closed_on_time_after_its_last_op(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """Found attacking the fix for defect 7: once a stranger's waiting op ended, the
    housekeeper was told of the ordinary idle deadline (300 s), not the stranger's."""
    broker = await exact_broker(nursery, emulator, wall, short_tmp, stranger_idle_timeout=10)
    await broker.login()
    server = broker.daemon.server
    assert server is not None
    conn = await RawConnection.open(broker.socket)
    await trio.testing.wait_all_tasks_blocked()
    (accepted,) = (c for c in server._connections.values() if c.waiting == 0 and not c.out)
    accepted.stranger = True  # (an in-process test's peer is root: mark it by hand)
    emulator.server.faults.add(Fault("latency", match="GET /api", seconds=5, times=1))
    started = trio.current_time()
    answer = await conn.call(id=1, op="refresh")
    assert answer["ok"] and trio.current_time() == started + 5
    assert await conn.receive() is None  # the end, at the stranger's idle deadline
    assert trio.current_time() == started + 15
    conn.close()


# -- defect 12: a config path that blocks -------------------------------------------------------


def wait_for_log(daemon: DaemonProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{daemon.log()}"
        time.sleep(0.05)


def test_a_fifo_at_the_config_path_delays_no_shutdown(
    emulator_process: EmulatorProcess, short_tmp: Path
) -> None:
    """The config replaced by a FIFO, then SIGHUP: the reload's read blocked until a
    writer came, and SIGTERM waited behind it. Now the FIFO is refused at once, and
    SIGTERM ends the daemon."""
    config = write_config(
        short_tmp / "c.toml", emulator_process.url, short_tmp / "b.sock", short_tmp / "state"
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        fifo = short_tmp / "fifo"
        os.mkfifo(fifo)
        fifo.replace(config)
        daemon.send_signal(signal.SIGHUP)
        wait_for_log(daemon, "not a regular file")
        assert call(short_tmp / "b.sock", op="hello")["ok"]  # the old config is kept
        daemon.send_signal(signal.SIGHUP)
        assert daemon.stop(timeout=10) == 0
    finally:
        daemon.close()


def test_a_fifo_as_the_config_is_refused_at_start(short_tmp: Path) -> None:
    fifo = short_tmp / "c.toml"
    os.mkfifo(fifo)
    result = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(fifo)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"geins-broker: {fifo}: not a regular file"


async def test_sigterm_cancels_a_reload_in_progress(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """A reload stuck reading (a hung network file system, say) is cancelled by the
    SIGTERM behind it, which the daemon hears at once."""
    broker = await start_broker(nursery, emulator, wall, short_tmp)
    daemon = broker.daemon

    async def stuck(fn: Any, *args: Any) -> Any:
        await trio.sleep_forever()

    daemon._read_offload = stuck
    send, receive = trio.open_memory_channel[int](2)
    nursery.start_soon(daemon._signals, receive)
    await send.send(signal.SIGHUP)
    await trio.sleep(1)
    assert daemon._reloading is not None  # still reading
    await send.send(signal.SIGTERM)
    await trio.sleep(0.001)
    assert daemon._reloading is None
    assert daemon._stop.is_set()
    assert trio.current_time() < 2  # not after the 10-s read timeout
