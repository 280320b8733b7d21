"""The customer-session surface attacked over real sockets, processes and uids.

Inputs that cross a trust boundary here: the caller's uid (the kernel's, SO_PEERCRED),
the app and handle it names, usernames and passwords, and what the daemon writes where
others may look (its log, status, metrics, the store file). The attacker is uid 65534
(setpriv), a storefront's service user for one app and a stranger to the other.
Switching uids needs root, as CI runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.cli.main import main as cli
from geins_broker_client import Client, calls
from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    DaemonProcess,
    EmulatorProcess,
    call,
    write_config,
)

NOBODY = 65534
_AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
#: Sends frames (hex, one per argument after the socket) on one connection and prints
#: each answer's hex on a line: the attacker's own client, with no library of ours.
_CLIENT = r"""
import socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
for frame in sys.argv[2:]:
    sock.sendall(bytes.fromhex(frame))
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    print(data.hex(), flush=True)
"""

#: Sends one frame (hex) on one connection again and again for some seconds, each
#: after the answer to the one before.
_AGAIN = r"""
import socket, struct, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(10)
sock.connect(sys.argv[1])
frame, until = bytes.fromhex(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while time.monotonic() < until:
    sock.sendall(frame)
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        data += sock.recv(65536)
"""


def as_nobody(sock: Path, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    """Each request's answer, sent by uid 65534 on one connection."""
    frames = [encode({"id": i, **r}).hex() for i, r in enumerate(requests, 1)]
    out = subprocess.run(
        [*_AS_NOBODY, "/usr/bin/python3", "-c", _CLIENT, str(sock), *frames],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    decoder = FrameDecoder(MAX_RESPONSE_SIZE)
    return [m for line in out for m in decoder.feed(bytes.fromhex(line))]


@pytest.fixture
def open_tmp(short_tmp: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o755)
    return short_tmp


@pytest.fixture
def emulator() -> Iterator[EmulatorProcess]:
    emulator = EmulatorProcess()
    try:
        yield emulator
    finally:
        emulator.stop()


@pytest.fixture
def daemon(open_tmp: Path, emulator: EmulatorProcess) -> Iterator[DaemonProcess]:
    """A daemon with two apps: `shop` for uid 65534, `outlet` for nobody but admins."""
    config = write_config(
        open_tmp / "c.toml",
        emulator.url,
        open_tmp / "b.sock",
        open_tmp / "state",
        broker={"socket_mode": "0666"},
        apps={"shop": {"allow_users": [NOBODY]}, "outlet": {}},
    )
    process = DaemonProcess(config, open_tmp)
    try:
        yield process
    finally:
        process.close()


def _login(app: str) -> dict[str, Any]:
    return {"op": "session_login", "app": app, "username": DEMO_USER, "password": DEMO_PASSWORD}


def test_another_apps_uid_is_refused(daemon: DaemonProcess, open_tmp: Path) -> None:
    sock = open_tmp / "b.sock"
    theirs = call(sock, **_login("outlet"))
    assert theirs["ok"], theirs
    mine, elsewhere, stolen, listing, ending = as_nobody(
        sock,
        _login("shop"),
        _login("outlet"),
        {"op": "session_token", "app": "outlet", "handle": theirs["handle"]},
        {"op": "sessions", "app": "shop"},
        {"op": "session_end", "app": "shop", "username": DEMO_USER},
    )
    assert mine["ok"] and mine["app"] == "shop", mine
    for refused in (elsewhere, stolen, listing, ending):
        assert refused["error"]["code"] == "forbidden", refused
    # The outlet's handle in the shop (the one app this uid may use): not found.
    (crossed,) = as_nobody(sock, {"op": "session_token", "app": "shop", "handle": theirs["handle"]})
    assert crossed["error"]["code"] == "unknown_session"
    token, status = as_nobody(
        sock,
        {"op": "session_token", "app": "shop", "handle": mine["handle"]},
        {"op": "status"},
    )
    assert token["ok"] and token["token"]
    assert status["apps"] == [{"app": "shop", "sessions": 1, "in_memory": 1}]


def test_handles_never_appear_in_log_status_metrics_or_store(
    daemon: DaemonProcess, open_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = open_tmp / "b.sock"
    with Client(sock) as client:
        created = [client.session_login("shop", DEMO_USER, DEMO_PASSWORD) for _ in range(3)]
        created.append(client.session_register("shop", "new@example.com", "pw-new-1"))
        handles = [c.handle for c in created]
        bearers = [client.session_token("shop", h).token for h in handles]
        client.session_passwd("shop", handles[0], DEMO_PASSWORD, "changed-pw")
        client.session_logout("shop", handles[1])
        status = client.call(calls.status(), lambda message: message)
        metrics = client.metrics()
        listed = client.sessions("shop")
    assert cli(["sessions", "shop", "--socket", str(sock), "--json"]) == 0
    assert cli(["status", "--socket", str(sock)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed.splitlines()[0])["app"] == "shop"
    assert "APP" in printed and "shop" in printed
    assert daemon.stop() == 0  # drained: every queued write on disk
    store = open_tmp / "state"
    files = {p.name: p.read_bytes() for p in store.iterdir() if p.name.startswith("customers")}
    assert "customers.sqlite" in files
    places = {
        "log": daemon.log(),
        "status": json.dumps(status),
        "metrics": metrics,
        "listing": repr(listed),
        "cli": printed,
        **{name: data.decode("latin-1") for name, data in files.items()},
    }
    for place, text in places.items():
        for secret in [*handles, *bearers, DEMO_PASSWORD, "changed-pw", "pw-new-1"]:
            assert secret not in text, f"a secret in the {place}"
    assert "customer_session_created" in places["log"]  # the log does speak of them


def test_a_session_logged_out_while_its_handle_is_used_stays_ended(
    daemon: DaemonProcess, emulator: EmulatorProcess, open_tmp: Path
) -> None:
    """The handle's holder asks for a bearer while its logout waits for Geins. Once the
    logout is answered, the handle opens nothing: no bearer, no info, nothing left in
    memory to serve, refresh or write back."""
    sock = open_tmp / "b.sock"
    (created,) = as_nobody(sock, _login("shop"))
    handle = created["handle"]
    token = {"op": "session_token", "app": "shop", "handle": handle}
    emulator.control("POST", "faults", {"kind": "latency", "match": "logout", "seconds": 1.5})
    logout_frame = encode({"id": 1, **token, "op": "session_logout"}).hex()
    logout = subprocess.Popen(
        [*_AS_NOBODY, "/usr/bin/python3", "-c", _CLIENT, str(sock), logout_frame],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.5)  # the logout is waiting for Geins
    as_nobody(sock, token)
    out, _ = logout.communicate(timeout=30)
    (answer,) = FrameDecoder(MAX_RESPONSE_SIZE).feed(bytes.fromhex(out.strip()))
    assert answer["ok"], answer
    _assert_ended(sock, [handle])


def test_a_customer_logged_out_everywhere_while_their_handles_are_used_stays_out(
    daemon: DaemonProcess, open_tmp: Path
) -> None:
    """Each handle's holder asks for a bearer again and again while an admin logs the
    customer out everywhere (each session's deletion being committed in turn). Once
    `session_end` is answered, no handle opens anything."""
    sock = open_tmp / "b.sock"
    handles = [created["handle"] for created in as_nobody(sock, *[_login("shop")] * 5)]
    frames = [encode({"id": 1, "op": "session_token", "app": "shop", "handle": h}) for h in handles]
    askers = [
        subprocess.Popen(
            [*_AS_NOBODY, "/usr/bin/python3", "-c", _AGAIN, str(sock), frame.hex(), "2"],
            stdout=subprocess.DEVNULL,
        )
        for frame in frames
    ]
    time.sleep(0.5)
    answer = call(sock, op="session_end", app="shop", username=DEMO_USER)
    for asker in askers:
        asker.wait(timeout=30)
    assert answer == {"id": 1, "ok": True, "ended": 5}, answer
    _assert_ended(sock, handles)


def _assert_ended(sock: Path, handles: list[str]) -> None:
    requests = [
        {"op": op, "app": "shop", "handle": h}
        for h in handles
        for op in ("session_token", "session_info")
    ]
    for refused in as_nobody(sock, *requests):
        assert refused.get("error", {}).get("code") == "unknown_session", refused
    assert call(sock, op="status")["apps"] == [
        {"app": "shop", "sessions": 0, "in_memory": 0},
        {"app": "outlet", "sessions": 0, "in_memory": 0},
    ]
