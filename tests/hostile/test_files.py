"""Attacks through files and paths the daemon (root here) writes or reads outside its
state directory: the node_exporter textfile and the key file's directory. The hostile
user is uid 65534 (setpriv); each refusal is one line naming the path, and what the
attacker pointed at is left as it was.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from geins_broker_client import Client
from tests.hostile.support import UNUSED_URL, as_nobody, assert_refused, serve_once
from tests.support import NOBODY, DaemonProcess, Scrape, wait_until, write_config


@pytest.fixture
def base(short_tmp: Path) -> Iterator[Path]:
    """A root-owned 0755 directory: others may enter it, not write it."""
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o755)
    yield short_tmp
    short_tmp.chmod(0o700)


def theirs(path: Path) -> Path:
    """A 0755 directory of uid 65534's, as a user's home is."""
    path.mkdir(mode=0o755)
    os.chown(path, NOBODY, NOBODY)
    return path


def textfile_failures(socket: Path) -> float:
    with Client(str(socket), timeout=5) as client:
        return Scrape(client.metrics())("geins_broker_textfile_write_failures_total")


def test_a_textfile_directory_swapped_for_a_link_writes_nothing_there(base: Path) -> None:
    """node_exporter's home is its own: from there it swaps the textfile's directory for
    a link to a root-only one, hoping the daemon replaces a root file with its own."""
    secret = base / "secret"
    secret.mkdir(mode=0o700)
    precious = secret / "geins_broker.prom"
    precious.write_text("root only\n")
    precious.chmod(0o600)
    home = theirs(base / "home")
    as_nobody("mkdir", "-m", "0755", str(home / "tf"))
    textfile = home / "tf" / "geins_broker.prom"
    config = write_config(
        base / "c.toml",
        UNUSED_URL,
        base / "b.sock",
        base / "state",
        metrics={"textfile": str(textfile), "textfile_interval": 1},
    )
    daemon = DaemonProcess(config, base)
    try:
        as_nobody("sh", "-c", f"mv {home}/tf {home}/tf.old && ln -s {secret} {home}/tf")
        # Written at start and then every second: two writes after the swap.
        failures = textfile_failures(base / "b.sock")
        wait_until(
            lambda: textfile_failures(base / "b.sock") >= failures + 2,
            10,
            "two writes of the textfile refused after the swap",
        )
        assert precious.read_text() == "root only\n"
        assert stat.S_IMODE(precious.stat().st_mode) == 0o600
        assert sorted(p.name for p in secret.iterdir()) == ["geins_broker.prom"]
        assert not (home / "tf.old" / "geins_broker.prom").exists()
        log = daemon.log()
        assert "textfile_write_failed" in log, log
        assert f"{home}: owned by uid 65534" in log, log
    finally:
        assert daemon.stop() == 0


def key_file(directory: Path) -> Path:
    path = directory / "geins-broker.key"
    path.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def test_a_key_in_a_directory_others_can_write_is_refused(base: Path) -> None:
    keys = base / "keys"
    keys.mkdir()
    keys.chmod(0o777)
    key = key_file(keys)
    config = write_config(
        base / "c.toml", UNUSED_URL, base / "b.sock", base / "state", broker={"key_file": str(key)}
    )
    assert_refused(serve_once(config), key, f"{keys}: writable by group or others (mode 0777)")
    assert key.exists()


def test_a_key_reached_through_another_users_link_is_refused(base: Path) -> None:
    keys = base / "keys"
    keys.mkdir(mode=0o700)
    key_file(keys)
    as_nobody("ln", "-s", str(keys), str(theirs(base / "theirs") / "via"))
    via = base / "theirs" / "via" / "geins-broker.key"
    config = write_config(
        base / "c.toml", UNUSED_URL, base / "b.sock", base / "state", broker={"key_file": str(via)}
    )
    assert_refused(serve_once(config), via, "owned by uid 65534")
