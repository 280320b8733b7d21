"""The clients' trust in the socket they find, attacked by another local uid.

A client must not send a byte (a password, a request for a token) to a socket another
uid controls: one planted where a client looks (TMPDIR/runtime-UID when there is no
XDG_RUNTIME_DIR, a directory everyone may write, a path handed over by a symlink), or
one reached through a directory swapped between the client's checks and its connect.
The attacker is uid 65534 (setpriv); the victim is root or uid 65533, running the
Python client, the CLI or the Node client. Switching uids needs root, as CI runs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from geins_broker_client import Client, UntrustedSocket
from geins_broker_client.paths import SYSTEM_SOCKET, find_socket
from tests.hostile.support import as_nobody, clean_env
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    GEINS_BROKER,
    NOBODY,
    READER,
    DaemonProcess,
    EmulatorProcess,
    as_uid,
    node_client_for_other_uids,
    python_as,
    write_config,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")
SECRET = "roots-secret-password"


# -- Planted sockets: the client verifies the daemon before it sends a byte ---------------
# Another user binds a look-alike broker.sock where a client looks (TMPDIR/runtime-0/
# geins-broker/ when root runs without XDG_RUNTIME_DIR, a world-writable directory, a path
# handed over by a symlink) and waits for a password.

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
    as_nobody("mkdir", "-m", "0777", str(tmp / "runtime-0"))
    as_nobody("mkdir", "-m", "0777", str(tmp / "runtime-0" / "geins-broker"))
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


# -- a directory swapped between the checks and the connect -----------------------------------------------------

FLIPPER = """
import ctypes, os, socket, sys, threading, time
base = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, RENAME_EXCHANGE = -100, 2
evil = os.path.join(base, "evil", "geins-broker")
os.makedirs(evil, mode=0o755)
listener = socket.socket(socket.AF_UNIX)
listener.bind(os.path.join(evil, "broker.sock"))
os.chmod(os.path.join(evil, "broker.sock"), 0o666)
listener.listen(64)
received = [0]
def serve():
    while True:
        conn, _ = listener.accept()
        conn.settimeout(1)
        try:
            received[0] += len(conn.recv(65536))
        except OSError:
            pass
        conn.close()
threading.Thread(target=serve, daemon=True).start()
os.symlink(os.path.join(base, "legit"), os.path.join(base, "runtime-65533"))
a = os.path.join(base, "runtime-65533").encode()
b = os.path.join(base, "evil").encode()
print("flipping", flush=True)
end = time.monotonic() + float(sys.argv[2])
stop = os.path.join(base, "stop")
for i in range(10_000_000):
    if i % 1000 == 0 and (time.monotonic() > end or os.path.exists(stop)):
        break
    libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
print("received", received[0], flush=True)
"""

VICTIM = """
const { BrokerClient } = await import(process.argv[1]);
const end = Date.now() + 4000;
for (let i = 0; i < 20000 && Date.now() < end; i++) {
  const client = new BrokerClient({ timeout: 300 });
  try { await client.hello(); } catch (e) {}
  try { client.close(); } catch (e) {}
}
"""


PYTHON_VICTIM = """
import time
from geins_broker_client import Client
end = time.monotonic() + 4
for _ in range(20000):
    if time.monotonic() > end:
        break
    try:
        with Client(timeout=0.3) as client:
            client.hello()
    except Exception:
        pass
"""


def _victim_command(victim: str) -> list[str]:
    """The victim, a client of READER's looking for the system service's socket."""
    if victim == "node":
        client = node_client_for_other_uids()
        return as_uid(READER, "node", "--input-type=module", "-e", VICTIM, str(client))
    return python_as(READER, "-c", PYTHON_VICTIM)


@pytest.mark.parametrize(
    "victim",
    [
        pytest.param(
            "node",
            # scripts/test says loudly when Node is missing; where it is, the client
            # must have been built (scripts/test builds it before pytest).
            marks=pytest.mark.skipif(shutil.which("node") is None, reason="no Node"),
        ),
        "python",
    ],
)
def test_no_client_talks_to_a_socket_behind_a_swapped_directory(
    short_tmp: Path, victim: str
) -> None:
    """The Node client checked only the socket's own directory (rules 1 and 2) and
    cannot read SO_PEERCRED (rule 3). Under TMPDIR/runtime-UID made by another uid (a
    client of the system service without XDG_RUNTIME_DIR), that uid swapped the
    directory (renameat2 RENAME_EXCHANGE: a symlink to a trusted directory <-> its own)
    between the lstat checks and connect, and the client sent to its socket. The client
    now resolves the socket's directory, requires every directory above to be a trusted
    uid's and not writable by others (unless sticky), and connects to the resolved path.
    The Python client held already: SO_PEERCRED names the other uid (rule 3)."""
    victim_command = _victim_command(victim)  # first: it fails where Node is not built
    short_tmp.chmod(0o755)
    base = short_tmp / "tmp"
    base.mkdir()
    base.chmod(0o1777)  # like /tmp: anyone may create, only owners rename
    legit = base / "legit" / "geins-broker"
    legit.mkdir(parents=True)
    (base / "legit").chmod(0o755)
    legit.chmod(0o755)
    with socket.socket(socket.AF_UNIX) as trusted:  # root's: trusted, refuses at once
        trusted.bind(str(legit / "broker.sock"))
        (legit / "broker.sock").chmod(0o666)  # the system service's socket, open to all
        flipper = subprocess.Popen(
            python_as(NOBODY, "-c", FLIPPER, str(base), "15"),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flipper.stdout is not None
        assert flipper.stdout.readline().strip() == "flipping"
        env = {"PATH": os.environ["PATH"], "TMPDIR": str(base), "HOME": "/nonexistent"}
        ran = subprocess.run(
            victim_command,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        (base / "stop").touch()
        out, _ = flipper.communicate(timeout=30)
        flipper.stdout.close()
    assert ran.returncode == 0, ran.stderr
    assert out.strip() == "received 0", f"the {victim} client sent to the other uid's socket"
