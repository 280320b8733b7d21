"""Attacks by a hostile local user, each a test over real sockets and real uids.

Every section names the attack and the defect it once was (issue 9). The attacker is
uid 65534 (setpriv); the victim is root, running the client or the daemon. Switching
uids needs root, as CI runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from geins_broker_client import Client, UntrustedSocket
from geins_broker_client.paths import SYSTEM_SOCKET, find_socket
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    GEINS_BROKER,
    NOBODY,
    DaemonProcess,
    EmulatorProcess,
    as_uid,
    python_as,
    write_config,
)

SECRET = "roots-secret-password"


@pytest.fixture
def base(short_tmp: Path) -> Path:
    """A root-owned 0755 directory: others may enter it, not write it."""
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o755)
    return short_tmp


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that names a socket or runtime directory."""
    dropped = {"XDG_RUNTIME_DIR", "GEINS_BROKER_SOCKET", "RUNTIME_DIRECTORY", "TMPDIR"}
    return {k: v for k, v in os.environ.items() if k not in dropped} | extra


# -- Planted sockets: the client verifies the daemon before it sends a byte ---------------
# Issue 9, defect 1 (password capture). Another user binds a look-alike broker.sock where a
# client looks (TMPDIR/runtime-0/geins-broker/ when root runs without XDG_RUNTIME_DIR, a
# world-writable directory, a path handed over by a symlink) and waits for a password.

_RECORDER = r"""
import os, socket, sys
where, log = sys.argv[1], sys.argv[2]
if where.startswith("fd:"):
    sock = socket.socket(fileno=int(where[3:]))  # bound by someone else; we listen
else:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(where)
    os.chmod(where, 0o777)
sock.listen(16)
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    with open(log, "ab", buffering=0) as out:
        out.write(b"<connection>")
        conn.settimeout(2)
        try:
            while data := conn.recv(65536):
                out.write(data)
        except OSError:
            pass
    conn.close()
"""


class FakeBroker:
    """A process of uid 65534 listening at a socket, writing down all it hears."""

    def __init__(self, where: str, log: Path, pass_fds: tuple[int, ...] = ()) -> None:
        log.touch()
        log.chmod(0o666)
        self.log = log
        self.process = subprocess.Popen(
            python_as(NOBODY, "-c", _RECORDER, where, str(log)),
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=pass_fds,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == "ready"

    def heard(self) -> bytes:
        return self.log.read_bytes()

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def fake_brokers() -> Iterator[list[FakeBroker]]:
    started: list[FakeBroker] = []
    yield started
    for broker in started:
        broker.stop()


def plant(fake_brokers: list[FakeBroker], where: Path | str, log: Path, **kw: object) -> FakeBroker:
    broker = FakeBroker(str(where), log, **kw)  # type: ignore[arg-type]
    fake_brokers.append(broker)
    return broker


def nobody_mkdir(path: Path, mode: str = "0777") -> None:
    subprocess.run(as_uid(NOBODY, "mkdir", "-m", mode, str(path)), check=True)


def login_cli(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GEINS_BROKER, "login", "--username", DEMO_USER, "--password-stdin", *args],
        input=SECRET + "\n",
        env=dict(env),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_socket_planted_under_tmp_never_hears_roots_password(
    base: Path, fake_brokers: list[FakeBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported attack: root runs `login` under sudo, without XDG_RUNTIME_DIR."""
    if any(os.path.lexists(p) for p in ("/run/user/0/geins-broker/broker.sock", SYSTEM_SOCKET)):
        pytest.skip("a real broker on this machine would be found first")
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)  # as /tmp is
    nobody_mkdir(tmp / "runtime-0")
    nobody_mkdir(tmp / "runtime-0" / "geins-broker")
    planted = tmp / "runtime-0" / "geins-broker" / "broker.sock"
    fake = plant(fake_brokers, planted, base / "heard")

    result = login_cli(clean_env(TMPDIR=str(tmp)))
    assert result.returncode == 3, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr  # one line, no traceback
    assert result.stderr.startswith("geins-broker: untrusted socket: refusing ")
    assert str(planted) in result.stderr
    assert "is owned by uid 65534" in result.stderr
    assert SECRET not in result.stderr + result.stdout

    for name in ("XDG_RUNTIME_DIR", "GEINS_BROKER_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp))
    with pytest.raises(UntrustedSocket, match="owned by uid 65534") as info:
        Client().login(DEMO_USER, SECRET)
    assert SECRET not in repr(info.value)
    assert fake.heard() == b""  # not even a connection


@pytest.mark.parametrize("how", ["explicit", "environment", "cli"])
def test_a_socket_in_a_directory_everyone_may_write_is_refused(
    base: Path, fake_brokers: list[FakeBroker], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Root made the directory, but 0777: anyone could have put the socket there."""
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    fake = plant(fake_brokers, shared / "b.sock", base / "heard")
    if how == "cli":
        result = login_cli(clean_env(), "--socket", str(shared / "b.sock"))
        assert result.returncode == 3
        assert "may be written by others (mode 0777)" in result.stderr
    else:
        if how == "environment":
            monkeypatch.setenv("GEINS_BROKER_SOCKET", str(shared / "b.sock"))
        client = Client(shared / "b.sock" if how == "explicit" else None)
        with pytest.raises(UntrustedSocket, match=r"its directory .* \(mode 0777\)"):
            client.login(DEMO_USER, SECRET)
    assert fake.heard() == b""


def test_a_socket_of_another_uid_in_our_private_directory_is_refused(
    base: Path, fake_brokers: list[FakeBroker]
) -> None:
    drop = base / "drop"
    drop.mkdir()
    drop.chmod(0o777)
    fake = plant(fake_brokers, drop / "b.sock", base / "heard")
    private = base / "private"
    private.mkdir(mode=0o700)
    (drop / "b.sock").rename(private / "b.sock")  # the socket file keeps its owner
    with pytest.raises(UntrustedSocket, match=r"b\.sock: it is owned by uid 65534"):
        Client(private / "b.sock").login(DEMO_USER, SECRET)
    assert fake.heard() == b""


def test_a_listener_of_another_uid_behind_our_own_socket_file_hears_nothing(
    base: Path, fake_brokers: list[FakeBroker]
) -> None:
    """Path and file are ours; only SO_PEERCRED shows who listens (who called listen())."""
    private = base / "private"
    private.mkdir(mode=0o700)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(private / "b.sock"))
    try:
        fake = plant(fake_brokers, f"fd:{sock.fileno()}", base / "heard", pass_fds=(sock.fileno(),))
    finally:
        sock.close()
    with pytest.raises(UntrustedSocket, match="the process listening runs as uid 65534"):
        Client(private / "b.sock").login(DEMO_USER, SECRET)
    assert fake.heard() in (b"", b"<connection>")  # connected, then hung up: nothing sent


def test_a_symlinked_directory_is_refused(base: Path, fake_brokers: list[FakeBroker]) -> None:
    elsewhere = base / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    os.chown(elsewhere, NOBODY, NOBODY)
    fake = plant(fake_brokers, elsewhere / "b.sock", base / "heard")
    (base / "link").symlink_to(elsewhere)
    with pytest.raises(UntrustedSocket, match=r"its directory .*/link is a symlink"):
        Client(base / "link" / "b.sock").login(DEMO_USER, SECRET)
    assert fake.heard() == b""


def test_the_default_search_skips_an_untrusted_place_for_a_trusted_one(
    base: Path, fake_brokers: list[FakeBroker], monkeypatch: pytest.MonkeyPatch
) -> None:
    xdg = base / "xdg"
    xdg.mkdir(mode=0o755)
    nobody_dir = xdg / "geins-broker"
    nobody_dir.mkdir()
    nobody_dir.chmod(0o777)
    plant(fake_brokers, nobody_dir / "broker.sock", base / "heard")
    tmp = base / "tmp"
    (tmp / "runtime-0" / "geins-broker").mkdir(parents=True, mode=0o700)
    ours = tmp / "runtime-0" / "geins-broker" / "broker.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(ours))
    try:
        monkeypatch.delenv("GEINS_BROKER_SOCKET", raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
        monkeypatch.setenv("TMPDIR", str(tmp))
        assert find_socket() == str(ours)
        listener.close()
        ours.unlink()  # nothing trusted left: the untrusted one is named, to be refused
        assert find_socket() == str(nobody_dir / "broker.sock")
    finally:
        listener.close()


def test_the_clients_own_and_roots_daemon_are_trusted(base: Path) -> None:
    """The happy paths: root's client and root's daemon; uid 65534 and root's daemon."""
    emulator = EmulatorProcess()
    run = base / "run"
    run.mkdir(mode=0o755)  # as /run/geins-broker is: others may enter, not write
    sock = run / "b.sock"
    config = write_config(
        base / "c.toml",
        emulator.url,
        sock,
        base / "state",
        broker={"socket_mode": "0666"},
        profile={"allow_users": [NOBODY]},
    )
    daemon = DaemonProcess(config, base)
    try:
        with Client(sock) as client:
            assert client.login(DEMO_USER, DEMO_PASSWORD).profile == "default"
            root_token = client.token().token
        probe = (
            "import sys; from geins_broker_client import Client; "
            "print(Client(sys.argv[1]).token().token)"
        )
        result = subprocess.run(
            python_as(NOBODY, "-c", probe, str(sock)),
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == root_token
    finally:
        assert daemon.stop() == 0
        emulator.stop()


# -- Planted runtime directories: the daemon will not listen where others can write -------
# Issue 9, defect 1, daemon side. The daemon refuses a runtime or socket directory that is
# a symlink, another uid's, or writable by others: one line and exit 2, never a traceback.

_CONFIG = """[profiles.default]
account = "demo"
api_key = "demo-api-key"
auth_service_url = "http://127.0.0.1:9"
merchant_api_url = "http://127.0.0.1:9"
"""


def serve(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GEINS_BROKER, "serve", "--config", str(config)],
        env=dict(env),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_daemon_refuses_a_runtime_directory_planted_under_tmp(base: Path) -> None:
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    nobody_mkdir(tmp / "runtime-0")
    config = base / "c.toml"
    config.write_text(f'[broker]\nstate_dir = "{base}/state"\n' + _CONFIG)
    result = serve(config, clean_env(TMPDIR=str(tmp)))
    assert result.returncode == 2
    assert result.stderr == (
        f"geins-broker: {tmp}/runtime-0: is owned by uid 65534, not by the daemon's uid 0\n"
    )
    assert os.listdir(tmp / "runtime-0") == []


@pytest.mark.parametrize("kind", ["writable", "foreign", "symlink"])
def test_the_daemon_refuses_a_socket_directory_others_control(base: Path, kind: str) -> None:
    target = base / "dir"
    if kind == "writable":
        target.mkdir()
        target.chmod(0o777)
        expected = "may be written by others (mode 0777)"
    elif kind == "foreign":
        target.mkdir(mode=0o700)
        os.chown(target, NOBODY, NOBODY)
        expected = "is owned by uid 65534, not by the daemon's uid 0"
    else:
        (base / "real").mkdir(mode=0o700)
        target.symlink_to(base / "real")
        expected = "is a symlink"
    config = base / "c.toml"
    config.write_text(
        f'[broker]\nsocket = "{target}/b.sock"\nstate_dir = "{base}/state"\n' + _CONFIG
    )
    result = serve(config, clean_env())
    assert result.returncode == 2
    assert result.stderr == f"geins-broker: {target}: {expected}\n"
    assert not os.path.lexists(target / "b.sock")


def test_the_daemon_makes_its_own_private_runtime_directory(base: Path) -> None:
    if os.path.isdir("/run/user/0"):
        pytest.skip("root has a runtime directory here: the daemon would use it")
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    config = base / "c.toml"
    config.write_text(f'[broker]\nstate_dir = "{base}/state"\n' + _CONFIG)
    daemon = DaemonProcess(config, base, env={"TMPDIR": str(tmp), "XDG_RUNTIME_DIR": ""})
    try:
        runtime = tmp / "runtime-0"
        assert runtime.stat().st_mode & 0o777 == 0o700
        assert (runtime / "geins-broker" / "broker.sock").exists()
        with Client(runtime / "geins-broker" / "broker.sock") as client:
            assert client.hello().version == 1
    finally:
        assert daemon.stop() == 0
