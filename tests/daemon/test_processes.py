"""The daemon and the emulator as real processes: signals, reload, exit codes, peer uids.

Real time here, so waits are short and bounded.
"""

from __future__ import annotations

import json
import os
import signal as signals
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from geins_broker_client.protocol import encode
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    GEINS_BROKER,
    NOBODY,
    DaemonProcess,
    EmulatorProcess,
    call,
    python_as,
    wait_until,
    write_config,
)


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    process = EmulatorProcess("--token-ttl", "60")
    try:
        yield process
    finally:
        assert process.stop() == 0


def login(socket_path: Path, profile: str = "default") -> dict[str, Any]:
    answer = call(
        socket_path, op="login", profile=profile, username=DEMO_USER, password=DEMO_PASSWORD
    )
    assert answer["ok"], answer
    return answer


def test_emulator_process_and_its_control_api(emulator: EmulatorProcess) -> None:
    assert emulator.control("GET", "stats") == {"counts": {}, "in_flight": 0, "peak_in_flight": 0}
    sessions = emulator.control("POST", "sessions", {"username": DEMO_USER, "count": 3})["sessions"]
    assert len({s["refresh_token"] for s in sessions}) == 3
    verdict = emulator.control("POST", "inspect", {"refresh_token": sessions[0]["refresh_token"]})
    assert verdict["state"] == "current"
    assert emulator.control("POST", "faults", {"kind": "status", "status": 503, "times": 1}) == {
        "faults": 1
    }
    assert emulator.control("DELETE", "faults") == {"faults": 0}


def test_emulator_rejects_bad_arguments() -> None:
    result = subprocess.run(
        [*GEINS_BROKER, "emulator", "--listen", "nowhere"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr


@pytest.mark.parametrize("signum", [signals.SIGTERM, signals.SIGINT])
def test_stop_signals_exit_cleanly_and_keep_sessions(
    emulator: EmulatorProcess, short_tmp: Path, signum: int
) -> None:
    sock = short_tmp / "b.sock"
    config = write_config(short_tmp / "c.toml", emulator.url, sock, short_tmp / "state")
    daemon = DaemonProcess(config, short_tmp)
    login(sock)
    token = call(sock, op="token")["token"]
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert daemon.stop(signum) == 0
    assert "STOPPING=1" in "\n".join(daemon.notify.messages)
    assert not sock.exists()
    assert "event=stopped" in daemon.log()
    again = DaemonProcess(config, short_tmp)
    try:
        assert call(sock, op="token")["token"] == token
    finally:
        assert again.stop() == 0


def test_sigterm_lets_a_request_in_flight_finish(
    emulator: EmulatorProcess, short_tmp: Path
) -> None:
    sock = short_tmp / "b.sock"
    daemon = DaemonProcess(
        write_config(short_tmp / "c.toml", emulator.url, sock, short_tmp / "state"), short_tmp
    )
    emulator.control("POST", "faults", {"kind": "latency", "seconds": 0.5, "match": "POST"})
    answers: list[dict[str, Any]] = []
    worker = threading.Thread(target=lambda: answers.append(login(sock)))
    worker.start()
    time.sleep(0.3)  # the login is waiting on the slow emulator
    assert daemon.stop(signals.SIGTERM) == 0
    worker.join(timeout=10)
    assert answers and answers[0]["ok"]


def test_sighup_reloads_profiles_without_dropping_sessions(
    emulator: EmulatorProcess, short_tmp: Path
) -> None:
    sock, state = short_tmp / "b.sock", short_tmp / "state"
    config = write_config(short_tmp / "c.toml", emulator.url, sock, state, profiles=("one",))
    daemon = DaemonProcess(config, short_tmp)
    try:
        login(sock, "one")
        token = call(sock, op="token", profile="one")["token"]

        write_config(config, emulator.url, sock, state, profiles=("one", "two"))
        daemon.reload()
        profiles = [p["profile"] for p in call(sock, op="status")["profiles"]]
        assert profiles == ["one", "two"]
        assert call(sock, op="token", profile="one")["token"] == token
        write_config(config, emulator.url, sock, state, profiles=("two",))
        daemon.reload()
        assert [p["profile"] for p in call(sock, op="status")["profiles"]] == ["two"]
        assert call(sock, op="token", profile="one")["error"]["code"] == "unknown_profile"
        config.write_text("[profiles.two]\naccount = 1\n")
        daemon.reload()
        assert "event=reload_failed" in daemon.log()
        assert [p["profile"] for p in call(sock, op="status")["profiles"]] == ["two"]
        write_config(config, emulator.url, sock, state, profiles=("one", "two"))
        daemon.reload()
        assert (
            call(sock, op="token", profile="one")["token"] == token
        )  # its session was kept on disk
    finally:
        assert daemon.stop() == 0


def test_bad_config_exits_2_naming_file_and_key(short_tmp: Path) -> None:
    config = short_tmp / "c.toml"
    config.write_text("[profiles.default]\naccount = 'a'\n")
    result = subprocess.run(
        [*GEINS_BROKER, "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert f"{config}: profiles.default.api_key: is required" in result.stderr
    assert "Traceback" not in result.stderr


def test_socket_option_overrides_the_config_files_socket(short_tmp: Path) -> None:
    """`serve --socket S` with a `socket` in the file serves on S (it once exited 2)."""
    in_file, given = short_tmp / "file.sock", short_tmp / "given.sock"
    config = write_config(short_tmp / "c.toml", "http://127.0.0.1:9", in_file, short_tmp / "s")
    with (short_tmp / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [*GEINS_BROKER, "serve", "--config", str(config), "--socket", str(given)],
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(lambda: given.exists() or daemon.poll() is not None, 15, "the socket")
        assert daemon.poll() is None, (short_tmp / "daemon.log").read_text()
        assert call(given, op="hello")["ok"]
        assert not in_file.exists()
    finally:
        daemon.send_signal(signals.SIGTERM)
        assert daemon.wait(timeout=10) == 0


def test_missing_config_exits_2(short_tmp: Path) -> None:
    env = {**os.environ, "XDG_CONFIG_HOME": str(short_tmp)}
    result = subprocess.run(
        [*GEINS_BROKER, "serve"], capture_output=True, text=True, check=False, env=env
    )
    assert result.returncode == 2
    assert "no configuration file" in result.stderr


def test_a_second_daemon_on_the_same_socket_refuses(
    emulator: EmulatorProcess, short_tmp: Path
) -> None:
    sock = short_tmp / "b.sock"
    config = write_config(short_tmp / "c.toml", emulator.url, sock, short_tmp / "state")
    # Its own state directory: on the same one the second would stop at the state lock.
    other = write_config(short_tmp / "d.toml", emulator.url, sock, short_tmp / "state2")
    daemon = DaemonProcess(config, short_tmp)
    try:
        result = subprocess.run(
            [*GEINS_BROKER, "serve", "--config", str(other)],
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
        assert result.returncode == 1
        assert "already listening" in result.stderr
        assert call(sock, op="hello")["ok"]
    finally:
        assert daemon.stop() == 0


def test_stale_socket_from_a_crash_is_replaced(emulator: EmulatorProcess, short_tmp: Path) -> None:
    sock = short_tmp / "b.sock"
    config = write_config(short_tmp / "c.toml", emulator.url, sock, short_tmp / "state")
    DaemonProcess(config, short_tmp).kill()
    assert sock.exists()
    daemon = DaemonProcess(config, short_tmp)
    assert call(sock, op="hello")["ok"]
    assert daemon.stop() == 0


# -- who may connect: SO_PEERCRED -------------------------------------------------------

_AS_NOBODY = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
sock.sendall(bytes.fromhex(sys.argv[2]))
data = b""
while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
    chunk = sock.recv(65536)
    if not chunk:
        break
    data += chunk
sys.stdout.write(data.hex())
"""


def as_nobody(sock: Path, groups: str | None = None, **message: Any) -> dict[str, Any]:
    """A request from uid 65534, in the supplementary `groups` given (comma-separated
    gids), else in none."""
    result = subprocess.run(
        python_as(
            NOBODY, "-c", _AS_NOBODY, str(sock), encode({"id": 1, **message}).hex(), groups=groups
        ),
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    )
    data = bytes.fromhex(result.stdout)
    answer: dict[str, Any] = msgpack.unpackb(data[4:], raw=False)
    return answer


@pytest.fixture
def open_tmp(short_tmp: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o755)
    return short_tmp


@pytest.mark.parametrize("allowed", [False, True])
def test_another_uid_is_refused_by_the_peer_check(
    emulator: EmulatorProcess, open_tmp: Path, allowed: bool
) -> None:
    sock = open_tmp / "b.sock"
    # The socket is deliberately 0666, so that the peer check, not the file mode, decides.
    profile = {"allow_users": [NOBODY]} if allowed else {}
    config = write_config(
        open_tmp / "c.toml",
        emulator.url,
        sock,
        open_tmp / "state",
        broker={"socket_mode": "0666"},
        profile=profile,
    )
    daemon = DaemonProcess(config, open_tmp)
    try:
        login(sock)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o666
        assert as_nobody(sock, op="hello")["ok"]
        token = as_nobody(sock, op="token")
        login_attempt = as_nobody(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD)
        status = as_nobody(sock, op="status")
        if allowed:
            assert token["ok"] and token["token"] == call(sock, op="token")["token"]
            assert [p["profile"] for p in status["profiles"]] == ["default"]
        else:
            assert token["error"]["code"] == "forbidden"
            assert status["profiles"] == []
        assert login_attempt["error"]["code"] == "forbidden"
        assert as_nobody(sock, op="logout")["error"]["code"] == "forbidden"
        assert call(sock, op="token")["ok"]
    finally:
        assert daemon.stop() == 0


ALLOWED_GROUP = 4242


@pytest.mark.parametrize(
    ("groups", "served"),
    [
        (None, False),
        ("4243", False),
        (str(ALLOWED_GROUP), True),
        # Over 256 groups: SO_PEERGROUPS says ERANGE, /proc/PID/status answers.
        (",".join(str(g) for g in [*range(5000, 5300), ALLOWED_GROUP]), True),
    ],
    ids=["no-groups", "other-group", "supplementary", "300-groups"],
)
def test_allow_groups_counts_supplementary_groups(
    emulator: EmulatorProcess, open_tmp: Path, groups: str | None, served: bool
) -> None:
    """The system deployment: clients are members of a group, never its primary one."""
    sock = open_tmp / "b.sock"
    config = write_config(
        open_tmp / "c.toml",
        emulator.url,
        sock,
        open_tmp / "state",
        broker={"socket_mode": "0666"},
        profile={"allow_groups": [ALLOWED_GROUP]},
    )
    daemon = DaemonProcess(config, open_tmp)
    try:
        login(sock)
        answer = as_nobody(sock, groups, op="token")
        if served:
            assert answer["ok"] and answer["token"] == call(sock, op="token")["token"]
        else:
            assert answer["error"]["code"] == "forbidden"
    finally:
        assert daemon.stop() == 0
    over_256 = groups is not None and groups.count(",") >= 256
    assert ("event=peer_groups_from_proc" in daemon.log()) == over_256
    if over_256:
        assert "reason=over_256_groups" in daemon.log()
    assert "event=peer_groups_unknown" not in daemon.log()


def test_state_files_and_socket_are_private(emulator: EmulatorProcess, short_tmp: Path) -> None:
    sock, state = short_tmp / "run" / "b.sock", short_tmp / "state"
    daemon = DaemonProcess(write_config(short_tmp / "c.toml", emulator.url, sock, state), short_tmp)
    try:
        login(sock)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        session_file = state / "default.session.json"
        assert stat.S_IMODE(session_file.stat().st_mode) == 0o600
        assert json.loads(session_file.read_text())["username"] == DEMO_USER
    finally:
        assert daemon.stop() == 0


def test_systemd_socket_activation(emulator: EmulatorProcess, short_tmp: Path) -> None:
    """systemd-socket-activate binds the socket and passes it as fd 3 (LISTEN_FDS)."""
    sock = short_tmp / "activated.sock"
    config = write_config(
        short_tmp / "c.toml", emulator.url, short_tmp / "unused.sock", short_tmp / "state"
    )
    notify = short_tmp / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify))
    receiver.settimeout(15)
    activator = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--listen",
            str(sock),
            f"--setenv=NOTIFY_SOCKET={notify}",
            *GEINS_BROKER,
            "serve",
            "--config",
            str(config),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(sock.exists, 15, "systemd-socket-activate binds", every=0.02)
        # The first connection starts the daemon, which then answers on the passed socket.
        assert call(sock, timeout=20, op="hello")["ok"]
        assert "READY=1" in receiver.recv(4096).decode().split("\n")
        login(sock)
        assert call(sock, op="token")["ok"]
        assert not (short_tmp / "unused.sock").exists()
    finally:
        activator.send_signal(signals.SIGTERM)
        activator.wait(timeout=10)
        receiver.close()
        if activator.stderr:
            activator.stderr.close()
