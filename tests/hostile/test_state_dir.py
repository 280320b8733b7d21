"""Attacks on the state directory, by another local user and by a second daemon.

Each one runs the real daemon as a process; the hostile user is uid 65534 (setpriv),
who plants links and directories where the daemon (root here) will look. The daemon
must refuse with one line and exit 2, and leave what it found as it was; a link is
never the state directory, even root's own.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.storage.statedir import LOCK_NAME
from tests.hostile.support import UNUSED_URL, as_nobody, assert_refused, serve_once
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    NOBODY,
    DaemonProcess,
    EmulatorProcess,
    call,
    write_config,
)


@pytest.fixture
def shared_tmp(short_tmp: Path) -> Iterator[Path]:
    """A directory like /tmp: anyone may create entries, nobody may rename others'."""
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o1777)
    yield short_tmp
    short_tmp.chmod(0o700)


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry's (mode, uid, size), to show that nothing was touched."""
    return {
        str(p.relative_to(directory)): (p.lstat().st_mode, p.lstat().st_uid, p.lstat().st_size)
        for p in [directory, *directory.rglob("*")]
    }


def test_a_planted_link_as_the_state_directory_is_refused(shared_tmp: Path) -> None:
    victim = shared_tmp / "victim"
    victim.mkdir(mode=0o755)  # root's, and readable: a chmod would show
    (victim / "precious").write_text("root's data")
    as_nobody("ln", "-s", str(victim), str(shared_tmp / "state"))
    before = snapshot(victim)
    config = write_config(
        shared_tmp / "c.toml", UNUSED_URL, shared_tmp / "b.sock", shared_tmp / "state"
    )
    assert_refused(serve_once(config), shared_tmp / "state", "symbolic link")
    assert snapshot(victim) == before


def test_another_users_directory_is_neither_chmodded_nor_used(shared_tmp: Path) -> None:
    state = shared_tmp / "state"
    as_nobody("mkdir", "-m", "0755", str(state))
    before = snapshot(state)
    config = write_config(shared_tmp / "c.toml", UNUSED_URL, shared_tmp / "b.sock", state)
    assert_refused(serve_once(config), state, f"owned by uid {NOBODY}")
    assert snapshot(state) == before


def test_a_state_directory_others_can_write_is_refused(short_tmp: Path) -> None:
    state = short_tmp / "state"
    state.mkdir()
    state.chmod(0o777)
    config = write_config(short_tmp / "c.toml", UNUSED_URL, short_tmp / "b.sock", state)
    assert_refused(serve_once(config), state, "writable by group or others (mode 0777)")
    assert stat.S_IMODE(state.stat().st_mode) == 0o777
    assert list(state.iterdir()) == []


def test_an_ancestor_another_user_owns_is_refused(shared_tmp: Path) -> None:
    """nobody owns a directory on the way: they could swap the state directory at will."""
    as_nobody("mkdir", "-m", "0755", str(shared_tmp / "theirs"))
    state = shared_tmp / "theirs" / "state"
    config = write_config(shared_tmp / "c.toml", UNUSED_URL, shared_tmp / "b.sock", state)
    assert_refused(serve_once(config), shared_tmp / "theirs", f"owned by uid {NOBODY}")
    assert not state.exists()


def test_a_link_another_user_planted_on_the_way_is_not_followed(shared_tmp: Path) -> None:
    real = shared_tmp / "real"
    real.mkdir(mode=0o700)
    as_nobody("ln", "-s", str(real), str(shared_tmp / "via"))
    config = write_config(
        shared_tmp / "c.toml", UNUSED_URL, shared_tmp / "b.sock", shared_tmp / "via" / "state"
    )
    assert_refused(serve_once(config), shared_tmp / "via", "symbolic link owned by uid 65534")
    assert list(real.iterdir()) == []


def test_a_link_of_our_own_on_the_way_is_followed(short_tmp: Path) -> None:
    """Like /var/run -> /run: a link root made is part of the system, not an attack."""
    (short_tmp / "real").mkdir(mode=0o700)
    (short_tmp / "via").symlink_to(short_tmp / "real")
    config = write_config(
        short_tmp / "c.toml", UNUSED_URL, short_tmp / "b.sock", short_tmp / "via" / "a" / "state"
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        assert call(short_tmp / "b.sock", op="status")["ok"]
        created = short_tmp / "real" / "a"
        assert stat.S_IMODE(created.stat().st_mode) == 0o700
        assert (created / "state" / LOCK_NAME).is_file()
    finally:
        assert daemon.stop() == 0


def test_links_and_fifos_planted_inside_redirect_nothing(
    short_tmp: Path, emulator_process: EmulatorProcess
) -> None:
    """Whoever got into the state directory once (a root mistake, an old shared mode)
    left links where the daemon reads and writes. They are never followed: the write
    replaces the link itself, and a FIFO is not waited on."""
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    victim = short_tmp / "victim"
    victim.write_text("not a session")
    (state / "default.session.json").symlink_to(victim)
    os.mkfifo(state / "other.session.json")
    config = write_config(
        short_tmp / "c.toml",
        emulator_process.url,
        short_tmp / "b.sock",
        state,
        profiles=("default", "other"),
    )
    daemon = DaemonProcess(config, short_tmp)
    try:
        sock = short_tmp / "b.sock"
        states = {p["profile"]: p["state"] for p in call(sock, op="status")["profiles"]}
        assert states == {"default": "logged_out", "other": "logged_out"}
        login = call(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD)
        assert login["ok"], login
        assert call(sock, op="token")["ok"]
    finally:
        assert daemon.stop() == 0
    assert victim.read_text() == "not a session"
    session = state / "default.session.json"
    assert not session.is_symlink() and stat.S_IMODE(session.stat().st_mode) == 0o600
    assert "state_unreadable" in daemon.log()


# -- two daemons, one state directory ------------------------------------------------------


def test_a_second_daemon_on_the_same_state_exits_naming_the_first(
    short_tmp: Path, emulator_process: EmulatorProcess
) -> None:
    state = short_tmp / "state"
    first_config = write_config(
        short_tmp / "1.toml", emulator_process.url, short_tmp / "1.sock", state
    )
    second_config = write_config(
        short_tmp / "2.toml", emulator_process.url, short_tmp / "2.sock", state
    )
    first = DaemonProcess(first_config, short_tmp)
    try:
        sock = short_tmp / "1.sock"
        assert call(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD)["ok"]
        partial = state / f".tmp-default.session.json.{first.process.pid}"
        partial.write_bytes(b"a write the first daemon has in flight")
        saved = (state / "default.session.json").read_bytes()

        result = serve_once(second_config)
        assert_refused(result, state, f"in use by another geins-broker (pid {first.process.pid})")
        assert result.stderr.count("\n") == 1  # the one line, nothing logged before it
        # The first daemon's session and its temporary file are as they were.
        assert (state / "default.session.json").read_bytes() == saved
        assert partial.exists()
        assert call(sock, op="token")["ok"]
        assert call(sock, op="refresh")["ok"]

        # The lock dies with its holder, even by kill -9.
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        first.close()
        second = DaemonProcess(second_config, short_tmp)
        try:
            assert call(short_tmp / "2.sock", op="token")["ok"]
            assert (state / LOCK_NAME).read_text() == f"{second.process.pid}\n"
        finally:
            assert second.stop() == 0
    finally:
        first.close()


def test_a_link_of_roots_own_as_the_state_directory_is_refused(short_tmp: Path) -> None:
    """The docs promise a link is never the state directory, whoever made it."""
    real = short_tmp / "real"
    real.mkdir(mode=0o700)
    (short_tmp / "state").symlink_to(real)
    config = write_config(
        short_tmp / "c.toml", UNUSED_URL, short_tmp / "b.sock", short_tmp / "state"
    )
    try:
        result = serve_once(config)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon started on a linked state directory")
    assert_refused(result, short_tmp / "state", "a symbolic link")
    assert list(real.iterdir()) == []
