"""Sealing (pure), the key sources, and the file store sealing through them."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli import main as cli
from broker.core.errors import StoreError
from broker.core.sealing import MAGIC, Key, KeyMissing, Keyring, SealError, Tampered, sealed_key_id
from broker.core.secret import Secret
from broker.daemon.config import BrokerConfig, ConfigError, parse
from broker.storage.keys import (
    CREDENTIAL_NAME,
    CREDENTIAL_UNSET,
    encode_key,
    load_keyring,
    parse_key,
    read_key_file,
)
from broker.storage.store import Record, SealedState, Store

PROFILE = "default"
DATA = b'{"format": 1, "profile": "default", "refresh_token": "r-123"}\n'
KEY_A, KEY_B = Key(b"a" * 32), Key(b"b" * 32)
RECORD = Record(
    username="ada@example.com",
    refresh=Secret("refresh-token-in-the-record"),
    bearer=Secret("a.b.c"),
    obtained_at=100.0,
    expires_at=1000.0,
    refreshes=2,
)


# -- the pure layer ------------------------------------------------------------------------


def test_round_trip_with_a_fresh_nonce_each_time() -> None:
    ring = Keyring(KEY_A)
    one, two = ring.seal(PROFILE, DATA), ring.seal(PROFILE, DATA)
    assert one != two  # a new nonce per write
    for blob in (one, two):
        assert blob.startswith(MAGIC) and b"r-123" not in blob
        assert sealed_key_id(blob) == KEY_A.name
        opened = ring.open(PROFILE, blob)
        assert (opened.data, opened.stale, opened.key) == (DATA, False, KEY_A)


def test_one_bit_flipped_at_any_byte_never_opens() -> None:
    ring = Keyring(KEY_A)
    blob = ring.seal(PROFILE, DATA)
    for position in range(len(blob)):
        damaged = bytearray(blob)
        damaged[position] ^= 1 << (position % 8)
        with pytest.raises(SealError):
            ring.open(PROFILE, bytes(damaged))


def test_a_sealed_blob_cut_short_never_opens() -> None:
    ring = Keyring(KEY_A)
    blob = ring.seal(PROFILE, DATA)
    for length in range(1, len(blob)):
        with pytest.raises(Tampered):
            ring.open(PROFILE, blob[:length])


def test_another_profiles_blob_does_not_open() -> None:
    ring = Keyring(KEY_A)
    with pytest.raises(Tampered, match="another profile"):
        ring.open("other", ring.seal(PROFILE, DATA))


def test_a_changed_key_id_does_not_open() -> None:
    ring = Keyring(KEY_A, (KEY_B,))
    blob = ring.seal(PROFILE, DATA)
    id_at = len(MAGIC) + 1
    swapped = blob[:id_at] + KEY_B.id + blob[id_at + len(KEY_B.id) :]
    with pytest.raises(Tampered):  # B is known, but did not seal it
        ring.open(PROFILE, swapped)
    unknown = blob[:id_at] + b"\0" * 8 + blob[id_at + 8 :]
    with pytest.raises(KeyMissing):
        ring.open(PROFILE, unknown)


def test_the_wrong_key_or_none_says_which_key_is_missing() -> None:
    blob = Keyring(KEY_A).seal(PROFILE, DATA)
    for ring in (Keyring(KEY_B), Keyring()):
        with pytest.raises(KeyMissing) as info:
            ring.open(PROFILE, blob)
        assert info.value.key_id == KEY_A.name
        assert KEY_A.name in str(info.value)


def test_a_previous_key_opens_and_asks_for_sealing_again() -> None:
    blob = Keyring(KEY_A).seal(PROFILE, DATA)
    opened = Keyring(KEY_B, (KEY_A,)).open(PROFILE, blob)
    assert (opened.data, opened.stale, opened.key) == (DATA, True, KEY_A)


def test_clear_blobs_pass_and_ask_for_sealing_only_when_there_is_a_key() -> None:
    assert Keyring().seal(PROFILE, DATA) == DATA
    assert Keyring().open(PROFILE, DATA).stale is False
    assert Keyring(KEY_A).open(PROFILE, DATA).stale is True


def test_no_key_material_in_any_repr() -> None:
    secret = base64.b64encode(KEY_A.material).decode()
    for value in (KEY_A, Keyring(KEY_A, (KEY_B,))):
        assert "aaaa" not in repr(value) and secret not in repr(value)
    assert Keyring(KEY_A).describe() == f"on: key {KEY_A.name}"
    assert Keyring().describe().startswith("off: no key configured")


# -- key sources ---------------------------------------------------------------------------


def key_file(path: Path, key: Key, mode: int = 0o600) -> Path:
    path.write_bytes(encode_key(key))
    path.chmod(mode)
    return path


def config_with(tmp_path: Path, **broker: object) -> BrokerConfig:
    data = {
        "broker": {"socket": str(tmp_path / "s"), "state_dir": str(tmp_path / "st"), **broker},
        "profiles": {"default": {"account": "a", "api_key": "k"}},
    }
    return parse(data, tmp_path / "config.toml")


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_key_file_is_used(tmp_path: Path, mode: int) -> None:
    config = config_with(tmp_path, key_file="key")  # relative to the config's directory
    key_file(tmp_path / "key", KEY_A, mode)
    ring, source = load_keyring(config, {})
    assert ring.current == KEY_A and ring.previous == ()
    assert source == f"key_file {tmp_path / 'key'}"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o700])
def test_a_key_file_others_could_read_is_refused(tmp_path: Path, mode: int) -> None:
    path = key_file(tmp_path / "key", KEY_A, mode)
    with pytest.raises(ConfigError, match=f"{path}: mode {mode:04o}; a key file must be 0600"):
        read_key_file(path)


def test_a_key_file_another_uid_owns_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root (CI runs as root)")
    path = key_file(tmp_path / "key", KEY_A)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534"):
        read_key_file(path)


def test_a_key_file_behind_a_link_is_refused(tmp_path: Path) -> None:
    key_file(tmp_path / "key", KEY_A)
    (tmp_path / "link").symlink_to(tmp_path / "key")
    with pytest.raises(ConfigError, match="link"):
        read_key_file(tmp_path / "link")


@pytest.mark.parametrize(
    "content", [b"", b"not base64!\n", base64.b64encode(b"short") + b"\n", b"a" * 32]
)
def test_a_key_file_that_is_no_key_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not a geins-broker key") as info:
        read_key_file(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_missing_key_file_is_an_error_not_clear_files(tmp_path: Path) -> None:
    config = config_with(tmp_path, key_file=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="absent: No such file"):
        load_keyring(config, {})


@pytest.fixture
def credentials(tmp_path: Path) -> Iterator[Path]:
    """A directory laid out as systemd lays out $CREDENTIALS_DIRECTORY: 0500, files 0400."""
    directory = tmp_path / "credentials" / "geins-broker.service"
    directory.mkdir(parents=True)
    yield directory
    directory.chmod(0o700)


def seal_credentials(directory: Path, content: bytes) -> None:
    path = directory / CREDENTIAL_NAME
    path.write_bytes(content)
    path.chmod(0o400)
    directory.chmod(0o500)


def test_the_systemd_credential_comes_first(tmp_path: Path, credentials: Path) -> None:
    seal_credentials(credentials, encode_key(KEY_B))
    key_file(tmp_path / "key", KEY_A)
    config = config_with(tmp_path, key_file="key", previous_key_file="key")
    ring, source = load_keyring(config, {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert (ring.current, ring.previous) == (KEY_B, (KEY_A,))
    assert source == f"credential {credentials / CREDENTIAL_NAME}"


@pytest.mark.parametrize("content", [None, b"none", b"none\n"])
def test_an_absent_credential_falls_back_to_the_key_file(
    tmp_path: Path, credentials: Path, content: bytes | None
) -> None:
    """`none` is what the units' SetCredential= default holds when no credential exists."""
    if content is not None:
        seal_credentials(credentials, content)
    key_file(tmp_path / "key", KEY_A)
    config = config_with(tmp_path, key_file="key")
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert load_keyring(config, env)[0].current == KEY_A
    assert load_keyring(config_with(tmp_path), env) == (Keyring(), "none")


def test_a_previous_key_only_opens(tmp_path: Path) -> None:
    key_file(tmp_path / "old", KEY_A)
    ring, _ = load_keyring(config_with(tmp_path, previous_key_file="old"), {})
    assert (ring.current, ring.previous) == (None, (KEY_A,))


def test_key_generate_to_a_private_file_never_overwrites(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "new.key"
    assert cli.main(["key", "generate", "--output", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key_file(path)
    assert key.name in capsys.readouterr().err
    before = path.read_bytes()
    assert cli.main(["key", "generate", "-o", str(path)]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert path.read_bytes() == before


def test_key_generate_to_stdout_makes_distinct_keys() -> None:
    keys = {
        subprocess.run(
            [".venv/bin/python", "-m", "broker", "key", "generate"],
            capture_output=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        ).stdout
        for _ in range(2)
    }
    assert len(keys) == 2
    for raw in keys:
        assert len(parse_key(raw, Path("stdout")).material) == 32


# -- the file store, sealed ----------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def store_with(state: Path, ring: Keyring) -> Store:
    store = Store(state, ring)
    store.prepare()
    return store


def test_sealed_files_hold_no_token_in_clear(state: Path) -> None:
    store = store_with(state, Keyring(KEY_A))
    store.save(PROFILE, RECORD)
    raw = store.path(PROFILE).read_bytes()
    assert raw.startswith(MAGIC)
    assert b"refresh-token-in-the-record" not in raw and b"a.b.c" not in raw
    assert b"ada@example.com" not in raw
    assert stat.S_IMODE(store.path(PROFILE).stat().st_mode) == 0o600
    assert store.load(PROFILE) == RECORD
    store.close()


def test_clear_and_previous_key_files_are_sealed_again_on_the_next_write(state: Path) -> None:
    clear = store_with(state, Keyring())
    clear.save("one", RECORD)
    clear.close()
    old = store_with(state, Keyring(KEY_A))
    old.save("two", RECORD)
    old.close()
    store = store_with(state, Keyring(KEY_B, (KEY_A,)))
    assert store.load("one") == RECORD and store.load("two") == RECORD
    assert store.stale == {"one", "two"}
    store.save("one", RECORD)
    store.save("two", RECORD)
    assert store.stale == set()
    for name in ("one", "two"):
        assert sealed_key_id(store.path(name).read_bytes()) == KEY_B.name
    store.close()
    assert store_with(state, Keyring(KEY_B)).load("two") == RECORD


@pytest.mark.parametrize("ring", [Keyring(), Keyring(KEY_B)], ids=["no key", "another key"])
def test_a_missing_key_leaves_the_file_byte_identical(state: Path, ring: Keyring) -> None:
    sealed = store_with(state, Keyring(KEY_A))
    sealed.save(PROFILE, RECORD)
    sealed.close()
    before = sealed.path(PROFILE).read_bytes()
    store = store_with(state, ring)
    with pytest.raises(SealedState, match=f"key {KEY_A.name}") as info:
        store.load(PROFILE)
    assert info.value.key_id == KEY_A.name
    with pytest.raises(StoreError, match="not overwritten"):
        store.save(PROFILE, Record(username="mallory"))
    with pytest.raises(StoreError, match="not overwritten"):
        store.delete(PROFILE)
    assert store.path(PROFILE).read_bytes() == before
    assert sorted(p.name for p in state.iterdir()) == [
        ".high-water",
        ".lock",
        "default.session.json",
    ]
    store.keyring = Keyring(KEY_A)  # the key is back (a reload)
    assert store.load(PROFILE) == RECORD
    store.save(PROFILE, RECORD)
    store.close()


def test_a_tampered_sealed_file_is_kept_not_set_aside(state: Path) -> None:
    store = store_with(state, Keyring(KEY_A))
    store.save(PROFILE, RECORD)
    raw = bytearray(store.path(PROFILE).read_bytes())
    raw[-1] ^= 0x01
    store.path(PROFILE).write_bytes(bytes(raw))
    with pytest.raises(SealedState, match="does not open"):
        store.load(PROFILE)
    assert store.path(PROFILE).read_bytes() == bytes(raw)
    store.close()


def test_reseal_rewrites_only_stale_files(state: Path) -> None:
    old = store_with(state, Keyring(KEY_A))
    old.save("one", RECORD)
    old.close()
    store = store_with(state, Keyring(KEY_B, (KEY_A,)))
    assert store.profiles() == ["one"]
    assert store.reseal("one") is True
    assert store.reseal("one") is False
    assert store.reseal("absent") is False
    assert Keyring(KEY_B).open("one", store.path("one").read_bytes()).stale is False
    store.close()


# -- the units -----------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["system", "user"])
def test_the_units_load_the_key_credential_without_failing_when_it_is_absent(unit: str) -> None:
    """systemd 252 fails a unit whose LoadCredential*= file is missing unless a
    SetCredential= of the same name stands in; the stand-in must be the value that
    keys.py reads as "no credential". ImportCredential= would be ignored by 252."""
    from tests.daemon.test_systemd_units import SYSTEM_SERVICE, USER_SERVICE

    service = (SYSTEM_SERVICE if unit == "system" else USER_SERVICE)["Service"]
    loaded = service["LoadCredentialEncrypted"]
    assert len(loaded) == 1 and loaded[0].split(":")[0] == CREDENTIAL_NAME
    assert service["SetCredential"] == [f"{CREDENTIAL_NAME}:{CREDENTIAL_UNSET.decode()}"]
    assert "ImportCredential" not in service and "LoadCredential" not in service
    assert service["LimitCORE"] == ["0"]
