"""Attacks on the sealed session files by whoever can write the state directory:
an older sealed copy put back (rollback) and a file in clear planted while a key is
set. Real files in a real state directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from broker.core.sealing import Key, Keyring
from broker.core.secret import Secret
from broker.storage.store import CorruptState, Record, Store


def record(refresh: str) -> Record:
    return Record(username="victim@example.com", refresh=Secret(refresh))


def opened(directory: Path, keyring: Keyring, **kwargs: str) -> Store:
    store = Store(directory, keyring, **kwargs)
    store.prepare()
    return store


def test_an_older_sealed_copy_put_back_is_refused(short_tmp: Path) -> None:
    keyring = Keyring(Key.generate())
    state = short_tmp / "state"
    store = opened(state, keyring)
    store.save("default", record("first"))
    saved = (state / "default.session.json").read_bytes()
    store.save("default", record("second"))
    store.close()
    (state / "default.session.json").write_bytes(saved)  # the attacker's copy

    store = opened(state, keyring)  # a restart: the mark survived it
    with pytest.raises(CorruptState, match="older"):
        store.load("default")
    store.close()


def test_the_newest_file_and_a_file_from_before_generations_still_load(short_tmp: Path) -> None:
    keyring = Keyring(Key.generate())
    state = short_tmp / "state"
    store = opened(state, keyring)
    # A sealed file written before files carried a generation: read once on upgrade.
    plain = record("old").to_json("default")
    store._replace(store.path("default"), keyring.seal("default", json.dumps(plain).encode()))
    loaded = store.load("default")
    assert loaded is not None and loaded.refresh is not None
    store.save("default", record("new"))
    store.close()
    store = opened(state, keyring)
    again = store.load("default")
    assert again is not None and again.refresh is not None
    assert again.refresh.reveal() == "new"
    store.close()


def test_a_planted_clear_file_is_refused_after_rekey(short_tmp: Path) -> None:
    keyring = Keyring(Key.generate())
    state = short_tmp / "state"
    store = opened(state, keyring)
    store.save("default", record("victim"))
    store.mark_rekeyed()  # what `geins-broker rekey` does once every file is sealed
    store.close()
    planted = json.dumps(record("attacker").to_json("default")).encode()
    (state / "default.session.json").write_bytes(planted)

    store = opened(state, keyring)
    with pytest.raises(CorruptState, match="in clear"):
        store.load("default")
    store.close()


@pytest.mark.parametrize("setting", ["refuse", "accept"])
def test_clear_sessions_setting_decides_before_any_rekey(short_tmp: Path, setting: str) -> None:
    state = short_tmp / "state"
    store = opened(state, Keyring())  # no key yet: files in clear
    store.save("default", record("clear"))
    store.close()
    store = opened(state, Keyring(Key.generate()), clear_sessions=setting)
    if setting == "refuse":
        with pytest.raises(CorruptState, match="in clear"):
            store.load("default")
    else:
        assert store.load("default") is not None
        assert "default" in store.stale
    store.close()


def test_the_whole_directory_restored_together_is_not_detected(short_tmp: Path) -> None:
    """The limit docs/security.md states: a copy of the whole state directory, marks
    included, is consistent in itself; only state outside it could tell."""
    keyring = Keyring(Key.generate())
    state, copy = short_tmp / "state", short_tmp / "copy"
    store = opened(state, keyring)
    store.save("default", record("first"))
    store.close()
    shutil.copytree(state, copy)
    store = opened(state, keyring)
    store.save("default", record("second"))
    store.close()
    shutil.rmtree(state)
    shutil.copytree(copy, state)
    store = opened(state, keyring)
    loaded = store.load("default")
    assert loaded is not None and loaded.refresh is not None
    assert loaded.refresh.reveal() == "first"
    store.close()


def test_writes_of_many_profiles_at_once_keep_every_mark(short_tmp: Path) -> None:
    """The daemon writes profiles from worker threads at once; the one marks file they
    share is replaced one at a time, and no mark is lost."""
    from concurrent.futures import ThreadPoolExecutor

    keyring = Keyring(Key.generate())
    store = opened(short_tmp / "state", keyring)
    names = [f"p{i}" for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: store.save(name, record(name)), names))
    store.close()
    store = opened(short_tmp / "state", keyring)
    assert all(store.marks().get(name) == 1 for name in names)
    store.close()
