"""Sealed sessions in the daemon: nothing in clear on disk, a missing key costs only its
profile (and touches no file), the key's return opens it, `rekey` survives kill -9, and
the daemon's memory is closed to its own uid."""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.core.sealing import Key, Keyring, sealed_key_id
from broker.core.secret import Secret
from broker.daemon.config import load
from broker.daemon.lifecycle import Daemon
from broker.emulator.app import Emulator
from broker.storage.keys import encode_key
from broker.storage.store import Record, Store
from geins_broker_client.trio_client import TrioClient
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    GEINS_BROKER,
    NOBODY,
    DaemonProcess,
    EmulatorProcess,
    RawConnection,
    as_uid,
    call,
    inline,
    python_as,
    start_broker,
    wait_until,
    write_config,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_systemd_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def write_key(path: Path, key: Key) -> Path:
    path.write_bytes(encode_key(key))
    path.chmod(0o600)
    return path


def every_file(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- in-process: what reaches the disk -------------------------------------------------------


async def test_no_token_in_clear_anywhere_under_the_state_directory(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    key = Key.generate()
    key_path = write_key(short_tmp / "broker.key", key)
    names = ("one", "two", "three")
    broker = await start_broker(
        nursery, emulator, wall, short_tmp, profiles=names, key_file=str(key_path)
    )
    for name in names:
        await broker.login(name, remember=True)
    await trio.sleep(3 * 900)  # several rotations each
    async with broker.client() as client:
        bearers = {(await client.token(profile=name)).token for name in names}
    assert all(p.session.refreshes >= 2 for p in broker.daemon.profiles.values())
    broker.daemon.stop()
    await trio.sleep(1)

    service = emulator.service
    refresh_tokens = set(service._refresh) | set(service._replaced)
    assert len(refresh_tokens) >= 3 * 3
    files = every_file(broker.state_dir)
    assert set(files) >= {str(broker.state_dir / f"{n}.session.json") for n in names}
    for path, content in files.items():
        for secret in refresh_tokens | bearers | {DEMO_USER}:
            assert secret.encode() not in content, f"{secret[:8]}... in clear in {path}"
        if path.endswith(".session.json"):
            assert sealed_key_id(content) == key.name


async def test_status_and_the_log_say_whether_sessions_are_sealed(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="broker")
    key = Key.generate()
    key_path = write_key(short_tmp / "broker.key", key)
    (short_tmp / "a").mkdir()
    (short_tmp / "b").mkdir()
    clear = await start_broker(nursery, emulator, wall, short_tmp / "a")
    sealed = await start_broker(nursery, emulator, wall, short_tmp / "b", key_file=str(key_path))
    for broker, expected in ((clear, "off: no key configured"), (sealed, f"on: key {key.name}")):
        connection = await RawConnection.open(broker.socket)
        status = await connection.call(id=1, op="status")
        connection.close()
        assert status["sealing"].startswith(expected)
    assert "event=sealing_off" in caplog.text
    assert f"event=sealing_on key={key.name}" in caplog.text
    assert encode_key(key).decode().strip() not in caplog.text


async def test_a_reload_with_a_refused_key_file_keeps_the_keys_it_has(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    key, new = Key.generate(), Key.generate()
    sock, state = short_tmp / "b.sock", short_tmp / "state"
    config = write_config(
        short_tmp / "c.toml",
        emulator.url,
        sock,
        state,
        broker={"key_file": str(write_key(short_tmp / "k1", key))},
    )
    daemon = Daemon(load(config), wall=wall, rng=random.Random(1), offload=inline)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    async with TrioClient(sock) as client:
        await client.login(DEMO_USER, DEMO_PASSWORD, remember=True)
    loose = write_key(short_tmp / "k2", new)
    loose.chmod(0o644)
    write_config(config, emulator.url, sock, state, broker={"key_file": str(loose)})
    await daemon.reload()
    assert daemon.roster.store.keyring.current == key  # the mistake changed nothing
    loose.chmod(0o600)
    write_config(
        config,
        emulator.url,
        sock,
        state,
        broker={"key_file": str(loose), "previous_key_file": str(short_tmp / "k1")},
    )
    await daemon.reload()
    assert daemon.roster.store.keyring == Keyring(new, (key,))
    connection = await RawConnection.open(sock)
    status = await connection.call(id=1, op="status")
    connection.close()
    assert status["sealing"] == f"on: key {new.name}, opens key {key.name}"
    await trio.sleep(900)  # a rotation: the session moves to the new key
    blob = (state / "default.session.json").read_bytes()
    assert sealed_key_id(blob) == new.name
    daemon.stop()


# -- real processes: a key goes missing, and comes back ------------------------------------


@pytest.fixture
def emulator_process() -> Iterator[EmulatorProcess]:
    process = EmulatorProcess()
    yield process
    process.stop()


def reload(daemon: DaemonProcess, sock: Path, done: Any) -> dict[str, Any]:
    """SIGHUP, then the status once `done(status)` holds (bounded by 10 s)."""
    daemon.send_signal(signal.SIGHUP)
    status: dict[str, Any] = wait_until(
        lambda: answer if done(answer := call(sock, op="status")) else None,
        10,
        "the reload's outcome",
    )
    return status


def states(status: dict[str, Any]) -> dict[str, str]:
    return {p["profile"]: p["state"] for p in status["profiles"]}


def test_a_missing_key_costs_only_its_profile_and_sighup_brings_it_back(
    emulator_process: EmulatorProcess, short_tmp: Path
) -> None:
    url, sock, state = emulator_process.url, short_tmp / "b.sock", short_tmp / "state"
    key = Key.generate()
    key_path = write_key(short_tmp / "broker.key", key)
    config = short_tmp / "c.toml"
    with_key = {"key_file": str(key_path)}
    write_config(config, url, sock, state, profiles=("vault", "open"), broker=with_key)
    daemon = DaemonProcess(config, short_tmp)
    try:
        assert call(sock, op="login", profile="vault", username=DEMO_USER, password=DEMO_PASSWORD)[
            "ok"
        ]
        vault_token = call(sock, op="token", profile="vault")["token"]
    finally:
        assert daemon.stop() == 0
    sealed_file = state / "vault.session.json"
    before = sealed_file.read_bytes()
    stat_before = sealed_file.stat()

    # The key is gone (an operator forgot the credential): the daemon starts anyway.
    write_config(config, url, sock, state, profiles=("vault", "open"))
    daemon = DaemonProcess(config, short_tmp)
    try:
        status = call(sock, op="status")
        assert states(status) == {"vault": "sealed", "open": "logged_out"}
        vault = next(p for p in status["profiles"] if p["profile"] == "vault")
        assert key.name in vault["last_error"] and "not configured" in vault["last_error"]
        # Nothing may replace the sealed session, and the other profile serves.
        answer = call(sock, op="login", profile="vault", username=DEMO_USER, password="x")
        assert answer["error"]["code"] == "not_logged_in" and "sealed" in answer["error"]["message"]
        assert call(sock, op="logout", profile="vault")["error"]["code"] == "not_logged_in"
        assert call(sock, op="token", profile="vault")["error"]["code"] == "not_logged_in"
        assert call(sock, op="login", profile="open", username=DEMO_USER, password=DEMO_PASSWORD)[
            "ok"
        ]
        assert call(sock, op="token", profile="open")["ok"]
        assert sealed_file.read_bytes() == before
        assert sealed_file.stat().st_mtime_ns == stat_before.st_mtime_ns
        assert sealed_file.stat().st_ino == stat_before.st_ino

        # The key is back: SIGHUP opens the session where it was.
        write_config(config, url, sock, state, profiles=("vault", "open"), broker=with_key)
        status = reload(daemon, sock, lambda s: states(s)["vault"] != "sealed")
        assert states(status) == {"vault": "active", "open": "active"}
        assert call(sock, op="token", profile="vault")["token"] == vault_token
        assert call(sock, op="refresh", profile="open")["ok"]  # the next write seals it
        assert sealed_key_id((state / "open.session.json").read_bytes()) == key.name
    finally:
        assert daemon.stop() == 0
    assert "event=state_sealed" in daemon.log() and "event=unsealed" in daemon.log()


def test_a_bad_key_file_stops_the_start_with_one_line(short_tmp: Path) -> None:
    key_path = short_tmp / "broker.key"
    key_path.write_bytes(encode_key(Key.generate()))
    key_path.chmod(0o644)
    config = write_config(
        short_tmp / "c.toml",
        "http://127.0.0.1:9",
        short_tmp / "b.sock",
        short_tmp / "state",
        broker={"key_file": str(key_path)},
    )
    result = subprocess.run(
        [*GEINS_BROKER, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"geins-broker: {key_path}: mode 0644; a key file must be 0600 or stricter"
    )
    assert "Traceback" not in result.stderr


# -- rekey ---------------------------------------------------------------------------------


def fill_state(state: Path, ring: Keyring, names: list[str]) -> dict[str, Record]:
    records = {
        name: Record(
            username=f"{name}@example.com",
            refresh=Secret(f"refresh-{name}-" + "x" * 200),
            login_required=True,
            refreshes=i,
        )
        for i, name in enumerate(names)
    }
    store = Store(state, ring)
    store.prepare()
    try:
        for name, record in records.items():
            store.save(name, record)
    finally:
        store.close()
    return records


def rekey(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GEINS_BROKER, "rekey", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rekey_setup(short_tmp: Path, old: Key, new: Key) -> Path:
    write_key(short_tmp / "old.key", old)
    write_key(short_tmp / "new.key", new)
    return write_config(
        short_tmp / "c.toml",
        "http://127.0.0.1:9",
        short_tmp / "b.sock",
        short_tmp / "state",
        broker={"key_file": "new.key", "previous_key_file": "old.key"},
    )


def test_rekey_seals_clear_and_old_sessions_with_the_current_key(short_tmp: Path) -> None:
    old, new = Key.generate(), Key.generate()
    config = rekey_setup(short_tmp, old, new)
    state = short_tmp / "state"
    records = fill_state(state, Keyring(old), ["p0", "p1", "p2"])
    records |= fill_state(state, Keyring(), ["clear"])

    result = rekey(config)
    assert result.returncode == 0, result.stderr
    assert f"re-sealed 4 session(s) with key {new.name}" in result.stdout
    store = Store(state, Keyring(new))
    store.prepare()
    try:
        for name, record in records.items():
            assert store.load(name) == record
            assert sealed_key_id(store.path(name).read_bytes()) == new.name
    finally:
        store.close()
    assert "already were" in rekey(config).stdout


def test_rekey_refuses_while_the_daemon_runs(short_tmp: Path) -> None:
    config = rekey_setup(short_tmp, Key.generate(), Key.generate())
    daemon = DaemonProcess(config, short_tmp)
    try:
        result = rekey(config)
    finally:
        assert daemon.stop() == 0
    assert result.returncode == 2
    assert f"(pid {daemon.process.pid}); stop the daemon first" in result.stderr


@pytest.mark.slow
def test_rekey_killed_at_fifty_random_moments_loses_no_session(short_tmp: Path) -> None:
    old, new = Key.generate(), Key.generate()
    config = rekey_setup(short_tmp, old, new)
    state = short_tmp / "state"
    rng = random.Random(os.getpid())
    started = time.monotonic()
    records = fill_state(state, Keyring(old), [f"p{i:04d}" for i in range(300)])
    assert rekey(config).returncode == 0
    whole_run = time.monotonic() - started  # a window wide enough to land anywhere in it
    outcomes = {"none_yet": 0, "part_way": 0, "all_done": 0}
    for _ in range(50):
        fill_state(state, Keyring(old), list(records))  # every session stale again
        process = subprocess.Popen(
            [*GEINS_BROKER, "rekey", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0, whole_run))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        store = Store(state, Keyring(new, (old,)))
        store.prepare()  # takes the lock the killed process held, sweeps its temporary
        try:
            assert store.profiles() == sorted(records)
            moved = 0
            for name, record in records.items():
                assert store.load(name) == record
                moved += sealed_key_id(store.path(name).read_bytes()) == new.name
        finally:
            store.close()
        key = "none_yet" if moved == 0 else "all_done" if moved == len(records) else "part_way"
        outcomes[key] += 1
    print(f"rekey kill -9 loop over {len(records)} sessions: {outcomes}")


# -- memory --------------------------------------------------------------------------------

_PROBE = r"""
import ctypes, os, sys
pid = int(sys.argv[1])
try:
    with open(f"/proc/{pid}/maps") as maps:
        start = int(maps.readline().split("-")[0], 16)
except PermissionError:
    start = 0  # the map is closed too; try the memory anyway
try:
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(start)
        print("mem:read" if mem.read(16) else "mem:empty")
except PermissionError:
    print("mem:refused")
except OSError as exc:
    print(f"mem:error-{exc.errno}")
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
    os.waitpid(pid, 0)
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    print("ptrace:attached")
else:
    print("ptrace:refused")
"""


def probe(pid: int) -> list[str]:
    result = subprocess.run(
        python_as(NOBODY, "-c", _PROBE, str(pid)),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return result.stdout.split()


def test_another_process_of_the_daemons_uid_cannot_read_its_memory(short_tmp: Path) -> None:
    """The daemon runs as uid 65534; so does the probe, which tries /proc/PID/mem and
    ptrace. As a control, the same probe reads an ordinary process of that uid."""
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o755)
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    os.chown(run, NOBODY, NOBODY)
    config = write_config(short_tmp / "c.toml", "http://127.0.0.1:9", run / "b.sock", state)
    config.chmod(0o644)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    control = subprocess.Popen(as_uid(NOBODY, "sleep", "60"))
    daemon = subprocess.Popen(
        python_as(NOBODY, "-m", "broker", "serve", "--config", str(config)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    try:
        wait_until(
            lambda: daemon.poll() is not None or (run / "b.sock").exists(),
            20,
            "the daemon binds its socket",
        )
        assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
        if probe(control.pid) != ["mem:read", "ptrace:attached"]:
            pytest.skip("this kernel keeps even a dumpable process from its own uid (Yama?)")
        assert probe(daemon.pid) == ["mem:refused", "ptrace:refused"]
        assert _status_field(daemon.pid, "CoreDumping") in (None, "0")
    finally:
        control.kill()
        control.wait()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=10)
        if daemon.stderr:
            daemon.stderr.close()


def _status_field(pid: int, name: str) -> str | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    return None


def test_the_daemon_limits_its_core_size_to_zero() -> None:
    """In a child, so the test process keeps its own limits."""
    code = (
        "import resource; from broker.daemon.hardening import keep_memory_private, dumpable;"
        "keep_memory_private();"
        "print(resource.getrlimit(resource.RLIMIT_CORE), dumpable())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "(0, 0) False"
