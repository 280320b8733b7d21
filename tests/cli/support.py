"""A real daemon and emulator for the tests that drive `geins-broker` subcommands."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.cli import main as cli
from tests.support import GEINS_BROKER, DaemonProcess, EmulatorProcess, write_config


@dataclass(frozen=True)
class CliStack:
    emulator: EmulatorProcess
    daemon: DaemonProcess
    socket: Path

    def run(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        """The command for real, against this daemon's socket."""
        return subprocess.run(
            [*GEINS_BROKER, *argv, "--socket", str(self.socket)],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def main(self, *argv: str) -> int:
        """The command in-process, against this daemon's socket."""
        return cli.main([*argv, "--socket", str(self.socket)])


@contextlib.contextmanager
def cli_stack(tmp: Path, emulator_args: tuple[str, ...] = (), **config: Any) -> Iterator[CliStack]:
    """An emulator process (`emulator_args`) and a daemon on it at `tmp`/b.sock, its
    config `write_config`'s with `config`; both stopped (the daemon first) afterwards."""
    emulator = EmulatorProcess(*emulator_args)
    try:
        socket = tmp / "b.sock"
        path = write_config(tmp / "c.toml", emulator.url, socket, tmp / "state", **config)
        daemon = DaemonProcess(path, tmp)
        try:
            yield CliStack(emulator, daemon, socket)
        finally:
            daemon.stop()
    finally:
        emulator.stop()
