"""A daemon with N logged-in profiles against the emulator, for the benchmarks.

Logging in ten thousand profiles through the daemon would take minutes of signature
round trips, so the emulator mints the sessions (`POST /_emulator/sessions`) and the
fleet writes them as the daemon's own state files, exactly as a daemon that had logged
them in and then restarted would find them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker.core.sealing import Keyring
from broker.core.secret import Secret
from broker.storage.store import Record, Store
from tests.support import DEMO_USER, DaemonProcess, EmulatorProcess, write_config


@dataclass
class Fleet:
    emulator: EmulatorProcess
    daemon: DaemonProcess | None
    socket: Path
    config: Path
    workdir: Path
    profiles: int
    #: Where the daemon runs from (another revision's tree), and its extra environment.
    cwd: Path | None = None
    env: dict[str, str] | None = None

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.process.pid

    def start(self) -> None:
        self.daemon = DaemonProcess(self.config, self.workdir, self.env, cwd=self.cwd)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_sessions(
    emulator: EmulatorProcess,
    state_dir: Path,
    names: list[str],
    *,
    due: bool,
    keyring: Keyring | None = None,
) -> None:
    """Saved sessions for `names`; `due`: their bearers expired while the daemon was down.
    With `keyring`, sealed with its current key."""
    store = Store(state_dir, keyring)
    store.prepare()
    try:
        _save_minted(emulator, store, names, due=due)
    finally:
        store.close()  # and its lock, or the daemon would not start


def _save_minted(emulator: EmulatorProcess, store: Store, names: list[str], *, due: bool) -> None:
    now = time.time()
    minted: list[dict[str, object]] = []
    while len(minted) < len(names):
        batch = min(5000, len(names) - len(minted))
        minted += emulator.control("POST", "sessions", {"username": DEMO_USER, "count": batch})[
            "sessions"
        ]
    for name, session in zip(names, minted, strict=True):
        obtained = now - 2000 if due else now
        store.save(
            name,
            Record(
                username=DEMO_USER,
                remember=True,
                refresh=Secret(str(session["refresh_token"])),
                bearer=Secret(str(session["token"])),
                obtained_at=obtained,
                expires_at=obtained + 900,
                session_expires_at=now + 7 * 24 * 3600,
            ),
        )


@contextlib.contextmanager
def fleet(
    profiles: int,
    *,
    logged_in: bool = True,
    due: bool = False,
    token_ttl: float = 900,
    broker: dict[str, object] | None = None,
    metrics: dict[str, object] | None = None,
    start: bool = True,
    source: Path | None = None,
) -> Iterator[Fleet]:
    """`source`: run the daemon of another tree (e.g. an older revision exported there)."""
    workdir = Path(tempfile.mkdtemp(prefix="gbb-", dir="/tmp"))  # short: a socket lives here
    emulator = EmulatorProcess("--token-ttl", f"{token_ttl:g}")
    names = ["default", *(f"p{i:05d}" for i in range(1, profiles))]
    socket = workdir / "b.sock"
    config = write_config(
        workdir / "c.toml",
        emulator.url,
        socket,
        workdir / "state",
        profiles=tuple(names),
        broker=broker,
        metrics=metrics,
    )
    if logged_in:
        write_sessions(emulator, workdir / "state", names, due=due)
    env = None if source is None else {"PYTHONPATH": f"{source}:{source}/clients/python"}
    running = Fleet(emulator, None, socket, config, workdir, profiles, source, env)
    try:
        if start:
            running.start()
        yield running
    finally:
        if running.daemon is not None:
            running.daemon.stop()
        emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
