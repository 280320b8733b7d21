"""Session files: private, atomic, and a bad file costs only its own profile."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.core.errors import StoreError
from broker.core.secret import Secret
from broker.storage.statedir import LOCK_NAME
from broker.storage.store import CorruptState, Record, Store
from tests.support import fill, remount

RECORD = Record(
    username="ada@example.com",
    remember=True,
    refresh=Secret("refresh-1"),
    bearer=Secret("a.b.c"),
    obtained_at=100.0,
    expires_at=1000.0,
    session_expires_at=5000.0,
    last_refresh_at=100.0,
    refreshes=3,
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    s.prepare()
    yield s
    s.close()


def names(directory: Path) -> list[str]:
    """The files in a state directory, less its lock."""
    return sorted(p.name for p in directory.iterdir() if p.name != LOCK_NAME)


def test_round_trip_and_modes(store: Store) -> None:
    store.save("default", RECORD)
    assert store.load("default") == RECORD
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path("default").stat().st_mode) == 0o600
    assert store.load("other") is None


def test_prepare_tightens_an_open_directory_and_sweeps_temporaries(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir(mode=0o755)
    (directory / ".tmp-default.session.json.123").write_text("half a wri")
    store = Store(directory)
    assert [p.name for p in store.prepare()] == [".tmp-default.session.json.123"]
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert names(directory) == []
    store.close()


def test_save_replaces_atomically(store: Store) -> None:
    store.save("default", RECORD)
    store.save("default", Record(username="bob", refresh=Secret("refresh-2")))
    loaded = store.load("default")
    assert loaded is not None and loaded.username == "bob" and loaded.bearer is None
    assert names(store.directory) == ["default.session.json"]


def test_repr_hides_tokens() -> None:
    assert "refresh-1" not in repr(RECORD)
    assert "a.b.c" not in repr(RECORD)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"format": 1, "profile": "default", "userna',  # truncated
        b"\x00\xff\xfe",
        b"[]",
        b'{"format": 2, "profile": "default"}',
        b'{"format": 1, "profile": "other", "remember": false, "login_required": false, "refreshes": 0}',
        b'{"format": 1, "profile": "default", "remember": "yes", "login_required": false, "refreshes": 0}',
        b'{"format": 1, "profile": "default", "remember": false, "login_required": false, "refreshes": 0,'
        b' "token": "a.b.c"}',
    ],
)
def test_corrupt_files_are_set_aside(store: Store, content: bytes) -> None:
    store.path("default").write_bytes(content)
    with pytest.raises(CorruptState) as info:
        store.load("default")
    assert info.value.set_aside is not None
    assert info.value.set_aside.read_bytes() == content
    assert not store.path("default").exists()
    assert store.load("default") is None


def test_delete(store: Store) -> None:
    store.save("default", RECORD)
    store.delete("default")
    store.delete("default")
    assert store.load("default") is None


def test_full_disk_fails_cleanly_and_keeps_the_old_file(tmpfs: Path) -> None:
    store = Store(tmpfs / "state")
    store.prepare()
    store.save("default", RECORD)
    filler = fill(tmpfs)
    big = Record(username="x" * 20000, refresh=Secret("refresh-2"))
    with pytest.raises(StoreError, match="No space left"):
        store.save("default", big)
    assert store.load("default") == RECORD
    assert names(store.directory) == ["default.session.json"]
    filler.unlink()
    store.save("default", big)
    assert store.load("default") == big
    store.close()


def test_read_only_disk_fails_cleanly(tmpfs: Path) -> None:
    store = Store(tmpfs / "state")
    store.prepare()
    store.save("default", RECORD)
    remount(tmpfs, "ro")
    try:
        with pytest.raises(StoreError, match="Read-only"):
            store.save("default", Record(username="bob"))
        with pytest.raises(StoreError, match="Read-only"):
            store.delete("default")
        assert store.load("default") == RECORD
    finally:
        remount(tmpfs, "rw")
        store.close()


def test_file_content_is_plain_json_for_operators(store: Store) -> None:
    store.save("default", RECORD)
    data = json.loads(store.path("default").read_text())
    assert data["format"] == 1 and data["username"] == "ada@example.com"
