"""The daemon's Unix socket, attacked by its callers: a reader who asks for tokens to force
refreshes, clients that leave answers unread, a stranger who floods the connection
slots, and directories planted where the daemon would make its socket.

The daemon and the emulator share one virtual wall clock (MockClock with autojump), so
times are asserted exactly; the attacks that live in the kernel (other uids) use real
processes.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
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
from geins_broker_client import Client
from geins_broker_client.errors import ProtocolError
from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from tests.hostile.support import as_nobody, clean_env, forged_jwt, serve_once
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

# -- a refresh storm by a reader -------------------------------------------------------------


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
    assert refreshed_at is not None
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


# -- answers a client leaves unread -----------------------------------------------------------


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
    slow_closed: bool = slow.closed  # read again: mypy keeps the earlier assert's narrowing
    assert slow_closed and server.admission.unread == 0 and server.admission.overflows == 2
    for _, theirs in pairs:
        theirs.close()


async def test_pipelined_big_answers_are_written_in_parts(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """64 pipelined requests whose answers are 60 KiB each would be joined into one
    3.8 MB write and queued whole. At most 256 KiB are joined, and what the
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


# -- a stranger's flood of connections, with real uids -------------------------------------

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


_ASK_PER_LINE = """
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
for line in sys.stdin:
    sock.sendall(bytes.fromhex(line.strip()))
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack_from(">I", data)[0]:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    print(data.hex(), flush=True)
"""


def test_an_open_connection_follows_every_change_of_what_it_may_read(
    emulator_process: EmulatorProcess, base: Path
) -> None:
    """One connection of a reader and one of a stranger, open throughout, each asking
    for the same token again and again (from the second answer on, the C hot path
    answers where it is built): a stranger is refused every time, and the reader's
    answers follow a reload that takes its access away, one that gives it back, one
    that changes the profile and keeps it, one that removes the profile, a rotation
    and a logout, each on its next request."""
    sock, config_path, state = base / "b.sock", base / "c.toml", base / "state"
    broker = {"socket_mode": "0666"}

    def configure(**settings: Any) -> Path:
        return write_config(
            config_path, emulator_process.url, sock, state, broker=broker, **settings
        )

    daemon = DaemonProcess(configure(profile={"allow_users": [READER]}), base)
    reader = script_as(READER, _ASK_PER_LINE, str(sock))
    stranger = script_as(NOBODY, _ASK_PER_LINE, str(sock))

    def ask(process: subprocess.Popen[str]) -> dict[str, Any]:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(encode({"id": 5, "op": "token"}).hex() + "\n")
        process.stdin.flush()
        (answer,) = FrameDecoder(MAX_RESPONSE_SIZE).feed(bytes.fromhex(process.stdout.readline()))
        return answer

    def code(process: subprocess.Popen[str]) -> str:
        answer = ask(process)
        return "ok" if answer["ok"] else str(answer["error"]["code"])

    try:
        assert call(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD)["ok"]
        assert [code(reader) for _ in range(3)] == ["ok"] * 3
        assert {code(stranger) for _ in range(100)} == {"forbidden"}
        configure(profile={"allow_users": []})
        daemon.reload()
        assert code(reader) == "forbidden"
        configure(profile={"allow_users": [READER]})
        daemon.reload()
        assert [code(reader) for _ in range(3)] == ["ok"] * 3
        configure(profile={"allow_users": [READER], "request_timeout": 7})
        daemon.reload()
        assert [code(reader) for _ in range(3)] == ["ok"] * 3
        configure(profiles=("other",), profile={"allow_users": [READER]})
        daemon.reload()
        assert code(reader) == "unknown_profile"
        configure(profile={"allow_users": [READER]})
        daemon.reload()
        old = ask(reader)["token"]
        assert ask(reader)["token"] == old
        assert call(sock, op="refresh")["ok"]
        assert ask(reader)["token"] != old
        assert call(sock, op="logout")["ok"]
        assert code(reader) == "not_logged_in"
        assert "Traceback" not in daemon.log()
    finally:
        for process in (reader, stranger):
            process.kill()
            process.communicate(timeout=10)
        daemon.close()


def test_a_strangers_flood_locks_out_neither_root_nor_a_reader(
    emulator_process: EmulatorProcess, base: Path
) -> None:
    """A uid that may read nothing held every connection slot, and root got `busy`.
    Now it gets at most max_connections_per_uid, the last slots are root's, and its
    idle connections are closed after stranger_idle_timeout."""
    sock = base / "b.sock"
    config = write_config(
        base / "c.toml",
        emulator_process.url,
        sock,
        base / "state",
        broker={
            "socket_mode": "0666",
            "max_connections": 16,
            "max_connections_per_uid": 8,
            "admin_reserved_connections": 4,
            "stranger_idle_timeout": 1,
        },
        profile={"allow_users": [READER]},
    )
    daemon = DaemonProcess(config, base)
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
    """Once a stranger's waiting op ended, the housekeeper was told of the ordinary idle
    deadline (300 s), not the stranger's: the connection outlived its bound."""
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


# -- Planted runtime directories: the daemon will not listen where others can write -------
# A socket made in another uid's directory is that uid's to replace (and the next client's
# password with it). The daemon refuses a runtime or socket directory that is a symlink,
# another uid's, or writable by others: one line and exit 2, never a traceback.

_CONFIG = """[profiles.default]
account = "demo"
api_key = "demo-api-key"
auth_service_url = "http://127.0.0.1:9"
merchant_api_url = "http://127.0.0.1:9"
"""


def test_the_daemon_refuses_a_runtime_directory_planted_under_tmp(base: Path) -> None:
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    as_nobody("mkdir", "-m", "0777", str(tmp / "runtime-0"))
    config = base / "c.toml"
    config.write_text(f'[broker]\nstate_dir = "{base}/state"\n' + _CONFIG)
    result = serve_once(config, clean_env(TMPDIR=str(tmp)))
    assert result.returncode == 2
    assert result.stderr == (
        f"geins-broker: {tmp}/runtime-0: is owned by uid 65534, not by the daemon's uid 0\n"
    )
    assert os.listdir(tmp / "runtime-0") == []


@pytest.mark.parametrize("kind", ["writable", "foreign", "symlink"])
def test_the_daemon_refuses_a_socket_directory_others_control(base: Path, kind: str) -> None:
    target = base / "dir"
    if kind == "writable":
        target.mkdir()
        target.chmod(0o777)
        expected = "may be written by others (mode 0777)"
    elif kind == "foreign":
        target.mkdir(mode=0o700)
        os.chown(target, NOBODY, NOBODY)
        expected = "is owned by uid 65534, not by the daemon's uid 0"
    else:
        (base / "real").mkdir(mode=0o700)
        target.symlink_to(base / "real")
        expected = "is a symlink"
    config = base / "c.toml"
    config.write_text(
        f'[broker]\nsocket = "{target}/b.sock"\nstate_dir = "{base}/state"\n' + _CONFIG
    )
    result = serve_once(config, clean_env())
    assert result.returncode == 2
    assert result.stderr == f"geins-broker: {target}: {expected}\n"
    assert not os.path.lexists(target / "b.sock")


def test_the_daemon_makes_its_own_private_runtime_directory(base: Path) -> None:
    if os.path.isdir("/run/user/0"):
        pytest.skip("root has a runtime directory here: the daemon would use it")
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    config = base / "c.toml"
    config.write_text(f'[broker]\nstate_dir = "{base}/state"\n' + _CONFIG)
    daemon = DaemonProcess(config, base, env={"TMPDIR": str(tmp), "XDG_RUNTIME_DIR": ""})
    try:
        runtime = tmp / "runtime-0"
        assert runtime.stat().st_mode & 0o777 == 0o700
        assert (runtime / "geins-broker" / "broker.sock").exists()
        with Client(runtime / "geins-broker" / "broker.sock") as client:
            assert client.hello().version == 1
    finally:
        assert daemon.stop() == 0
