"""The proxy's door, attacked by other local uids over real processes: floods of
connections, a reader forcing refreshes through 401s, a stranger filling the log,
HEAD requests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy.stack import GET_USER, ProxyStack, proxy_stack
from tests.support import (
    NOBODY,
    READER,
    as_uid,
    call,
    python_as,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[ProxyStack]:
    """A daemon whose proxy listens on loopback TCP (32 connections at most) and on a
    Unix socket anyone may connect to; profile `shared` is readable by READER, and
    NOBODY may read nothing. Both profiles are logged in."""
    with proxy_stack(short_tmp, shared_for=READER, proxy={"max_connections": 32}) as started:
        for profile in ("default", "shared"):
            started.login(profile)
        yield started


def curl_status(
    stack: ProxyStack, *extra: str, as_user: list[str] | None = None, via: str = "tcp"
) -> int:
    """The status of a GraphQL request through the proxy (0: no answer)."""
    if via == "unix":
        extra = ("--unix-socket", str(stack.proxy_socket), *extra)
    out = subprocess.run(
        [
            *(as_user or []),
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "5",
            "-w",
            "%{http_code}",
            "-H",
            "Content-Type: application/json",
            "-d",
            GET_USER,
            *extra,
            f"http://127.0.0.1:{stack.port}/graphql",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return int(out.stdout or 0)


@contextlib.contextmanager
def held_connections(uid: int, count: int, target: str) -> Iterator[None]:
    """`count` connections to the proxy (`target`: "tcp:PORT" or a socket path) made
    and held open, silent, by a process of another uid."""
    if target.startswith("tcp:"):
        make = f"s=socket.socket(); s.connect(('127.0.0.1', {int(target[4:])}))"
    else:
        make = f"s=socket.socket(socket.AF_UNIX); s.connect({target!r})"
    script = (
        "import socket,sys\n"
        "held=[]\n"
        f"for _ in range({count}):\n"
        f"    {make}\n"
        "    held.append(s)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
    )
    attacker = subprocess.Popen(
        python_as(uid, "-c", script),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "held"
        time.sleep(0.5)  # the daemon accepts them all
        yield
    finally:
        assert attacker.stdin is not None and attacker.stdout is not None
        attacker.stdin.close()
        attacker.wait(timeout=10)
        attacker.stdout.close()


@pytest.mark.parametrize("via", ["tcp", "unix"])
def test_a_strangers_flood_of_proxy_connections_locks_out_no_one(
    stack: ProxyStack, via: str
) -> None:
    """The proxy counted connections only in total: a uid that may read no profile
    held all 32 (on TCP any local uid can connect), and root and every reader got 503
    until it let go. The broker's socket has per-uid limits; the proxy needs
    them too."""
    target = f"tcp:{stack.port}" if via == "tcp" else str(stack.proxy_socket)
    with held_connections(NOBODY, 32, target):
        assert curl_status(stack, via=via) == 200
        shared = ("-H", "Geins-Broker-Profile: shared")
        assert curl_status(stack, *shared, as_user=as_uid(READER), via=via) == 200


def test_a_readers_flood_of_proxy_connections_locks_out_no_admin(stack: ProxyStack) -> None:
    """A reader may hold connections, but not the admins' reserve."""
    with held_connections(READER, 32, f"tcp:{stack.port}"):
        assert curl_status(stack) == 200


def _refreshes(stack: ProxyStack, profile: str) -> int:
    answer = call(stack.broker_socket, op="status")
    assert answer["ok"], answer
    (found,) = [p for p in answer["profiles"] if p["profile"] == profile]
    return int(found["refreshes"])


def test_a_reader_cannot_refresh_faster_through_the_proxy_than_by_token(stack: ProxyStack) -> None:
    """A reader may bring a refresh forward once per `reader_refresh_interval` (30 s)
    by asking for a token. Through the proxy, any 401 from Geins (here: an auth path
    without its header, which Geins refuses whatever the bearer) made the profile
    rotate, as soon as its bearer was 10 s old: three times as often, and for any
    request path the reader chooses."""
    logout = f"http://127.0.0.1:{stack.port}/api/demo_prod/logout"
    shared = ["-H", "Geins-Broker-Profile: shared"]
    before = _refreshes(stack, "shared")
    statuses = []
    for _ in range(2):
        time.sleep(10.5)  # the bearer is old enough to be rotated on a 401
        out = subprocess.run(
            [
                *as_uid(READER),
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "--max-time",
                "5",
                "-w",
                "%{http_code}",
                *shared,
                logout,
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        statuses.append(out.stdout)
    assert statuses == ["401", "401"]
    assert _refreshes(stack, "shared") - before <= 1


def test_a_stranger_connecting_in_a_loop_does_not_flood_the_log(stack: ProxyStack) -> None:
    """Each connection turned away at the door was one warning line: a loop of connects
    wrote the log as fast as it could (and under journald, its rate limit then drops
    the lines that matter). A refusal is now logged at most once per 10 s per reason."""
    script = (
        "import socket\n"
        "for _ in range(300):\n"
        "    s=socket.socket()\n"
        f"    s.connect(('127.0.0.1', {stack.port}))\n"
        "    s.recv(4096)\n"
        "    s.close()\n"
    )
    subprocess.run(python_as(NOBODY, "-c", script), timeout=30, check=True)
    assert curl_status(stack) == 200
    assert stack.daemon.log().count("connection_refused") <= 2


def test_a_head_request_is_answered_not_logged_as_a_failure(stack: ProxyStack) -> None:
    """HEAD through the proxy: the emulator (any answer with a body, here a 405) and
    then the proxy (its 502) wrote a body for a HEAD, which h11 refuses; each request
    left an error with a traceback in the log and no answer. Any reader could fill the
    log with them. An answer to HEAD now has its headers only."""
    script = (
        "import socket\n"
        f"s=socket.create_connection(('127.0.0.1', {stack.port}), timeout=5)\n"
        "s.sendall(b'HEAD /graphql HTTP/1.1\\r\\nHost: x\\r\\n"
        "Geins-Broker-Profile: shared\\r\\n\\r\\n')\n"
        "print(s.recv(4096).split(b'\\r\\n')[0].decode())\n"
    )
    out = subprocess.run(
        python_as(READER, "-c", script), capture_output=True, text=True, timeout=20, check=True
    )
    assert out.stdout.strip() == "HTTP/1.1 405 Method Not Allowed"
    assert "connection_failed" not in stack.daemon.log()
