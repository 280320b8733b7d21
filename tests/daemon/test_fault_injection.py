"""The daemon's test-only faults (broker/daemon/fault_injection.py): off unless asked for."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from broker.daemon import fault_injection
from tests.support import GEINS_BROKER, DaemonProcess, EmulatorProcess, wait_until, write_config


def test_armed_parses_names_and_refuses_unknown_ones() -> None:
    assert fault_injection.armed({}) == frozenset()
    assert fault_injection.armed({"GEINS_BROKER_TEST_FAULTS": " hang-on-sigusr1 ,"}) == {
        "hang-on-sigusr1"
    }
    with pytest.raises(fault_injection.FaultSpecError, match="unknown fault hang-on-usr2"):
        fault_injection.armed({"GEINS_BROKER_TEST_FAULTS": "hang-on-usr2"})


def test_unknown_fault_is_a_startup_error(short_tmp: Path) -> None:
    config = write_config(
        short_tmp / "c.toml", "http://127.0.0.1:1", short_tmp / "b.sock", short_tmp / "state"
    )
    result = subprocess.run(
        [*GEINS_BROKER, "serve", "--config", str(config)],
        env={"GEINS_BROKER_TEST_FAULTS": "nope", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "GEINS_BROKER_TEST_FAULTS: unknown fault nope" in result.stderr


def test_hang_on_sigusr1_stops_the_watchdog_pings(short_tmp: Path) -> None:
    emulator = EmulatorProcess()
    config = write_config(
        short_tmp / "c.toml", emulator.url, short_tmp / "b.sock", short_tmp / "state"
    )
    env = {"WATCHDOG_USEC": "100000", "GEINS_BROKER_TEST_FAULTS": "hang-on-sigusr1"}
    daemon = DaemonProcess(config, short_tmp, env=env)
    try:
        daemon.send_signal(signal.SIGUSR1)
        wait_until(lambda: "event=test_fault" in daemon.log(), 10, "event=test_fault in the log")
        daemon.notify.drain()
        before = len(daemon.notify.messages)
        time.sleep(0.3)  # three ping intervals
        assert daemon.notify.drain()[before:] == []
        assert daemon.process.poll() is None  # wedged, not dead
    finally:
        daemon.kill()
        emulator.stop()


def test_without_the_fault_sigusr1_keeps_its_default_action(short_tmp: Path) -> None:
    emulator = EmulatorProcess()
    config = write_config(
        short_tmp / "c.toml", emulator.url, short_tmp / "b.sock", short_tmp / "state"
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        daemon.send_signal(signal.SIGUSR1)
        assert daemon.process.wait(timeout=10) == -signal.SIGUSR1
    finally:
        daemon.close()
        emulator.stop()
