"""What the daemon says to systemd: READY, STATUS, WATCHDOG, STOPPING; journald prefixes."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from broker.daemon.notify import Notifier
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    GEINS_BROKER,
    DaemonProcess,
    EmulatorProcess,
    call,
    wait_until,
    write_config,
)


def test_ready_status_watchdog_and_stopping(short_tmp: Path) -> None:
    emulator = EmulatorProcess()
    sock = short_tmp / "b.sock"
    config = write_config(
        short_tmp / "c.toml", emulator.url, sock, short_tmp / "state", profiles=("a", "b")
    )
    daemon = DaemonProcess(config, short_tmp, env={"WATCHDOG_USEC": "200000"})
    try:
        ready = next(m for m in daemon.notify.messages if "READY=1" in m).split("\n")
        assert "STATUS=2 profiles (2 logged_out); 0 connections" in ready
        assert f"MAINPID={daemon.process.pid}" in ready
        assert call(sock, op="login", profile="a", username=DEMO_USER, password=DEMO_PASSWORD)["ok"]
        daemon.notify.wait_for(
            "STATUS=2 profiles (1 active, 1 logged_out); ", timeout=5, prefix=True
        )
        wait_until(  # every 0.1 s: half of WatchdogSec
            lambda: sum(m == "WATCHDOG=1" for m in daemon.notify.drain()) >= 4,
            0.6,
            "four watchdog pings",
            every=0.01,
        )
    finally:
        assert daemon.stop() == 0
        emulator.stop()
    assert "STOPPING=1\nSTATUS=stopping" in daemon.notify.messages


def test_no_watchdog_pings_for_another_pid(short_tmp: Path) -> None:
    emulator = EmulatorProcess()
    config = write_config(
        short_tmp / "c.toml", emulator.url, short_tmp / "b.sock", short_tmp / "state"
    )
    daemon = DaemonProcess(config, short_tmp, env={"WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    try:
        time.sleep(0.4)
        assert "WATCHDOG=1" not in daemon.notify.drain()
    finally:
        assert daemon.stop() == 0
        emulator.stop()


def test_notifier_speaks_to_abstract_sockets_and_is_silent_without_one() -> None:
    name = f"geins-broker-test-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(5)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"})
        assert notifier.enabled
        assert notifier.watchdog_interval == 15.0
        notifier.ready("fine")
        assert receiver.recv(4096).decode().split("\n")[:2] == ["READY=1", "STATUS=fine"]
    finally:
        receiver.close()
    silent = Notifier({})
    assert not silent.enabled
    assert silent.watchdog_interval is None
    silent.ready("nobody listens")  # a no-op, not an error


def test_journald_priority_prefixes(short_tmp: Path) -> None:
    """Under systemd, stderr is the journal ($JOURNAL_STREAM names it): lines carry <N>."""
    emulator = EmulatorProcess()
    config = write_config(
        short_tmp / "c.toml", emulator.url, short_tmp / "b.sock", short_tmp / "state"
    )
    log = short_tmp / "journal"
    with log.open("wb") as stderr:
        info = os.fstat(stderr.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}", "NOTIFY_SOCKET": ""}
        process = subprocess.Popen(
            [*GEINS_BROKER, "serve", "--config", str(config)], stderr=stderr, env=env
        )
        try:
            wait_until(lambda: "event=ready" in log.read_text(), 15, "event=ready in the log")
        finally:
            process.terminate()
            assert process.wait(timeout=10) == 0
            emulator.stop()
    lines = log.read_text().splitlines()
    # Without a key, the start says that sessions are stored in clear.
    assert any(line.startswith("<6>level=info event=sealing_off ") for line in lines)
    assert any(line.startswith("<6>level=info event=ready ") for line in lines)
    assert all(line.startswith("<") for line in lines)
