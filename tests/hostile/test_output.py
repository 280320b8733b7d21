"""What the CLI prints, when the store or the upstream lies.

A node name or a lease holder in Redis (which every local user may write when it has no
password) and a `user` field in a bearer's claims (a lying upstream, or a planted
session) reach root's terminal through `geins-broker status`, `cluster` and `user`; a
customer's username through `geins-broker sessions`.
Each carries OSC and CSI sequences here: a window title, a screen clear and a clipboard
write (OSC 52). Real processes: redis-server, the emulator, the daemon and the CLI.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli.output import terminal_safe
from geins_broker_client import Client
from tests.fleet.support import Fleet, RedisServer
from tests.support import GEINS_BROKER, DaemonProcess, EmulatorProcess, wait_until, write_config

#: Sets the window title, clears the screen, writes the clipboard.
PLANTED = "\x1b]0;owned\x07\x1b[2J\x1b]52;c;b3duZWQ=\x07\x9b31m"
PASSWORD = "a-password"


def test_terminal_safe_escapes_controls_and_keeps_printable_unicode() -> None:
    assert terminal_safe(PLANTED) == ("\\x1b]0;owned\\x07\\x1b[2J\\x1b]52;c;b3duZWQ=\\x07\\x9b31m")
    assert terminal_safe("Åsa Öberg ✓ \x7f\x00\n") == "Åsa Öberg ✓ \\x7f\\x00\\x0a"
    assert terminal_safe("a 1\nb 2\x1b\n", keep_newlines=True) == "a 1\nb 2\\x1b\n"


@pytest.fixture
def redis(short_tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(short_tmp)
    try:
        yield server
    finally:
        server.stop()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GEINS_BROKER, *args], capture_output=True, text=True, timeout=30, check=False
    )


def assert_escaped(output: str) -> None:
    assert "\x1b" not in output, output
    assert "\x07" not in output, output
    assert "\x9b" not in output, output
    assert "\\x1b]0;owned\\x07" in output, output


def test_escapes_from_the_store_and_the_upstream_reach_no_terminal(
    short_tmp: Path, redis: RedisServer
) -> None:
    user = "evil" + PLANTED + "@example.com"
    emulator = EmulatorProcess("--token-ttl", "600", "--user", f"{user}:{PASSWORD}")
    fleet = None
    try:
        fleet = Fleet(short_tmp, emulator, redis.url, nodes=1)
        with fleet.client(0) as client:
            client.login(user, PASSWORD)
        # A node name and a lease holder planted in the store, heartbeat fresh.
        seconds, _ = redis.command("TIME")
        redis.command("HSET", "geins-broker:nodes", PLANTED, seconds)
        redis.command("SET", "geins-broker:{default}:lease", PLANTED + " x", "PX", "60000")
        wait_until(
            lambda: (
                PLANTED in (fleet.status(0)[0]["fleet"]["nodes"] or [])
                and fleet.status(0)[0]["fleet"]["lease_holder"] == PLANTED
            ),
            10,
            "the daemon reports the planted node and lease holder",
        )
        socket = str(fleet.socket(0))
        for command in ("status", "cluster", "user"):
            result = cli(command, "--socket", socket)
            assert result.returncode == 0, result
            assert_escaped(result.stdout + result.stderr)
    finally:
        if fleet is not None:
            fleet.close()
        emulator.stop()


def test_a_customers_username_reaches_no_terminal_raw(short_tmp: Path) -> None:
    """A customer's username is theirs to choose (through the storefront) and the admin
    listing prints it: neither escape sequences nor bidirectional overrides (which make
    a listing show text in another order than it has, "Trojan Source") reach the
    terminal of whoever runs `geins-broker sessions`."""
    user = "evil" + PLANTED + "\u202etxt.exe\u2066@example.com"
    emulator = EmulatorProcess("--user", f"{user}:{PASSWORD}")
    short_tmp.chmod(0o755)
    config = write_config(
        short_tmp / "c.toml",
        emulator.url,
        short_tmp / "b.sock",
        short_tmp / "state",
        apps={"shop": {}},
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        with Client(short_tmp / "b.sock") as client:
            client.session_login("shop", user, PASSWORD)
        result = cli("sessions", "shop", "--socket", str(short_tmp / "b.sock"))
        assert result.returncode == 0, result
        assert_escaped(result.stdout)
        for override in ("\u202e", "\u2066"):
            assert override not in result.stdout, result.stdout
        assert "\\u202e" in result.stdout, result.stdout
    finally:
        daemon.close()
        emulator.stop()
