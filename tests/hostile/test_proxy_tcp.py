"""The proxy's loopback TCP listener, attacked by another local uid over real sockets.

Over TCP the proxy learns the caller's uid from the kernel by the connection's 4-tuple.
A caller that closes its socket right after sending leaves an orphan that the kernel
soon turns into a timewait entry, reported as uid 0 with inode 0: while accept() was
behind, such a request ran as root, with any profile's bearer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from broker.core.clock import SystemClock
from broker.emulator.app import Emulator
from broker.proxy import peers
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    NOBODY,
    DaemonProcess,
    EmulatorProcess,
    call,
    free_port,
    python_as,
    running,
    start_broker,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")
#: Connections queued ahead of the attack, so the daemon's accept-and-identify falls behind.
QUEUED = 900

#: Connects `count` times without waiting, then sends a request on one more connection and
#: closes it at once (an orphan); then one last connection, whose answer (the proxy turns
#: a stranger away) says the daemon has accepted and identified everything before it.
ATTACK = """
import socket, sys, time
family, host, port, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
queued = []
for _ in range(count):
    s = socket.socket(family)
    s.setblocking(False)
    s.connect_ex((host, port))
    queued.append(s)
body = b'{"query": "{ getUser { email } }"}'
evil = socket.socket(family)
evil.connect((host, port))
evil.sendall(
    b"POST /graphql HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
    + b"Content-Length: " + str(len(body)).encode() + b"\\r\\n\\r\\n" + body
)
evil.close()
last = socket.socket(family)
last.settimeout(60)
last.connect((host, port))
last.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
print(last.recv(100).split(b"\\r\\n")[0].decode(), flush=True)
"""


@dataclass
class Proxy:
    daemon: DaemonProcess
    emulator: EmulatorProcess
    family: int
    host: str
    port: int


@pytest.fixture(params=[(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")], ids=["v4", "v6"])
def proxy(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[Proxy]:
    """A daemon (root) whose proxy listens on loopback TCP, its `default` profile logged
    in and readable by root and the daemon's user only."""
    family, host = request.param
    emulator = EmulatorProcess()
    port = free_port()
    listen = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
    config = write_config(
        short_tmp / "c.toml", emulator.url, short_tmp / "broker.sock", short_tmp / "state"
    )
    with config.open("a") as toml:
        toml.write(f'[proxy]\ntcp = "{listen}"\n')
    daemon = DaemonProcess(config, short_tmp, wait_ready=False)
    with running(daemon, emulator):
        daemon.wait_ready()
        answer = call(
            short_tmp / "broker.sock", op="login", username=DEMO_USER, password=DEMO_PASSWORD
        )
        assert answer["ok"], answer
        yield Proxy(daemon, emulator, family, host, port)


def graphql_calls(emulator: EmulatorProcess) -> int:
    counts = emulator.control("GET", "stats")["counts"]
    return sum(n for route, n in counts.items() if route.startswith("graphql"))


def test_a_request_from_a_closed_socket_does_not_run_as_root(proxy: Proxy) -> None:
    """Nobody queues connections so the proxy falls behind, sends a request on one more
    and closes it at once; by the time the proxy looks the socket up, it is a timewait
    entry (uid 0, inode 0). The request must be refused, not run as root."""
    before = graphql_calls(proxy.emulator)
    attack = subprocess.run(
        [
            *python_as(NOBODY, "-c", ATTACK),
            str(int(proxy.family)),
            proxy.host,
            str(proxy.port),
            str(QUEUED),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.strip() == "HTTP/1.1 403 Forbidden"  # the stranger, turned away
    # The orphan's request, had it been taken for root's, is forwarded by now or soon:
    # give it the time an upstream round trip takes here, many times over.
    with pytest.raises(AssertionError, match="not within"):
        wait_until(lambda: graphql_calls(proxy.emulator) > before, 1.0, "a forwarded request")
    requests = [line for line in proxy.daemon.log().splitlines() if "event=request " in line]
    assert not [line for line in requests if " uid=0" in line], requests


# -- who is calling, without netlink -----------------------------------------------------


def _no_netlink(*args: object) -> None:
    raise OSError(97, "Address family not supported by protocol")  # EAFNOSUPPORT


@contextlib.contextmanager
def accepted_from_sources(sources: list[str]) -> Iterator[list[socket.socket]]:
    """A listener on 127.0.0.1; uid 65534 connects to it once from each source address,
    each time from the listener's own port number."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        script = (
            "import socket,sys\n"
            "held=[]\n"
            f"for host in {sources!r}:\n"
            "    s=socket.socket()\n"
            f"    s.bind((host, {port}))\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "    held.append(s)\n"
            "sys.stdin.read()\n"
        )
        client = subprocess.Popen(python_as(NOBODY, "-c", script), stdin=subprocess.PIPE)
        accepted: list[socket.socket] = []
        try:
            server.settimeout(10)
            for _ in sources:
                accepted.append(server.accept()[0])
            yield accepted
        finally:
            for sock in accepted:
                sock.close()
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=10)


def test_a_source_port_equal_to_the_listeners_is_not_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without netlink (a unit without AF_NETLINK), /proc/net/tcp was searched by ports alone.
    A stranger who connects from 127.0.0.N:P to the proxy's 127.0.0.1:P matches two
    lines: its own, and the daemon's accepted end (local port P, remote port P), owned
    by the daemon's user, an admin. Whichever the kernel lists first won, so a few
    source addresses were enough to be taken for the daemon and be served any profile."""
    monkeypatch.setattr(peers, "_uid_by_sock_diag", _no_netlink)
    sources = [f"127.0.0.{n}" for n in range(2, 6)]
    uids = []
    for _ in range(10):  # which line comes first depends on the port: a few listeners
        with accepted_from_sources(sources) as accepted:
            for sock in accepted:
                peer = peers.tcp_peer(sock)
                uids.append(None if peer is None else peer.uid)
    assert uids == [NOBODY] * len(uids)


async def test_a_slow_tcp_peer_lookup_never_stalls_the_daemon(
    nursery: trio.Nursery,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without netlink, a TCP caller's uid comes from reading /proc/net/tcp, which any
    local user can make long (12,000 sockets: tens of milliseconds per connection). On
    the event loop, a stranger connecting in a loop would stall every client, the broker
    socket included. The look-up runs through the daemon's offload, a worker thread:
    here it is held until the test has seen the daemon answer on its broker socket
    meanwhile, so the test says how the look-up runs, not how fast this machine is."""
    entered, release = threading.Event(), threading.Event()
    ran_on: list[threading.Thread] = []

    def held_lookup(*args: object) -> int | None:
        ran_on.append(threading.current_thread())
        entered.set()
        release.wait(10)  # bounded: on the event loop this would stall it for 10 s
        return None

    monkeypatch.setattr(peers, "_uid_by_sock_diag", _no_netlink)
    monkeypatch.setattr(peers, "_uid_by_proc", held_lookup)
    emulator = Emulator(clock=SystemClock().now)  # the real clock: a worker thread runs
    await emulator.start(nursery)
    broker = await start_broker(
        nursery,
        emulator,
        SystemClock(),
        short_tmp,
        offload=trio.to_thread.run_sync,
        proxy={"tcp": "127.0.0.1:0"},
    )
    proxy = broker.daemon.proxy
    assert proxy is not None and proxy.tcp_address is not None
    caller = trio.socket.socket()
    await caller.connect(proxy.tcp_address)
    try:
        with trio.fail_after(10):
            assert await trio.to_thread.run_sync(entered.wait, 10)
            async with broker.client() as client:
                hello = await client.hello()  # answered while the look-up is held
        assert hello.version == 1
        assert entered.is_set() and not release.is_set()
    finally:
        release.set()
        caller.close()
    assert ran_on and all(t is not threading.main_thread() for t in ran_on)
