"""The config file as an attack surface: a FIFO put at its path must block neither a
reload nor the shutdown behind it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import trio.testing
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from tests.support import (
    DaemonProcess,
    EmulatorProcess,
    call,
    start_broker,
    wait_until,
    write_config,
)


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
        wait_until(lambda: "not a regular file" in daemon.log(), 10, "the FIFO refused")
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
    # Read again: mypy keeps the narrowing of the assert above across the awaits.
    reloading: trio.CancelScope | None = daemon._reloading
    assert reloading is None
    assert daemon._stop.is_set()
    assert trio.current_time() < 2  # not after the 10-s read timeout
