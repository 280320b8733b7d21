"""A daemon with customer-session apps behind its proxy, for the proxy-by-handle tests.

Apps: `shop` (for NOBODY, cookie `__Host-geins`), `outlet` (for READER) and `taped`
(for NOBODY, cookie `taped`), whose Merchant API is a recording relay in front of the
emulator (every /graphql request's headers kept). Both proxy listeners
are on: the Unix socket (anyone may connect) and loopback TCP.
"""

from __future__ import annotations

import json
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.proxy.stack import GET_USER, proxy_toml, remote_toml, started
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    NOBODY,
    READER,
    DaemonProcess,
    EmulatorProcess,
    call,
    free_port,
    write_config,
)


class Recorder:
    """An upstream in front of the emulator that keeps the headers of every request
    it relays to the Merchant API's /graphql (and relays the rest, the signature
    service's, unrecorded)."""

    def __init__(self, emulator_url: str) -> None:
        seen: list[list[tuple[str, str]]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = [(k.lower(), v) for k, v in self.headers.items()]
                if self.path.startswith("/graphql"):
                    seen.append(headers)
                request = urllib.request.Request(  # noqa: S310 - the test's emulator
                    emulator_url + self.path,
                    data=body if self.command == "POST" else None,
                    method=self.command,
                    headers={k: v for k, v in headers if k not in ("host", "content-length")},
                )
                try:
                    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
                        status, data = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, data = error.code, error.read()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _relay

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class SessionStack:
    daemon: DaemonProcess
    emulator: EmulatorProcess
    recorder: Recorder
    broker_socket: Path
    proxy_socket: Path
    port: int
    handles: dict[str, str] = field(default_factory=dict)

    def login(self, app: str, username: str = DEMO_USER, password: str = DEMO_PASSWORD) -> str:
        """A new session's handle (logged in as root, an admin)."""
        answer = call(
            self.broker_socket, op="session_login", app=app, username=username, password=password
        )
        assert answer["ok"], answer
        handle: str = answer["handle"]
        return handle

    def curl(
        self, *headers: str, via: str = "unix", as_user: list[str] | None = None
    ) -> tuple[int, Any]:
        """A GraphQL getUser through the proxy with `headers`: (status, JSON body)."""
        target = (
            ["--unix-socket", str(self.proxy_socket), "http://geins/graphql"]
            if via == "unix"
            else [f"http://127.0.0.1:{self.port}/graphql"]
        )
        extra = [arg for header in headers for arg in ("-H", header)]
        out = subprocess.run(
            [
                *(as_user or []),
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-w",
                "\n%{http_code}",
                "-H",
                "Content-Type: application/json",
                "-d",
                GET_USER,
                *extra,
                *target,
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        body, _, status = out.rpartition("\n")
        return int(status), json.loads(body) if body else None


def session_stack(
    tmp: Path,
    emulator_args: tuple[str, ...] = ("--token-ttl", "120"),
    app: Mapping[str, Any] | None = None,
    broker: Mapping[str, Any] | None = None,
) -> Iterator[SessionStack]:
    """The stack (module docstring), `app`'s settings added to `shop`'s."""
    tmp.chmod(0o755)
    emulator = EmulatorProcess(*emulator_args)
    recorder = Recorder(emulator.url)
    port = free_port()
    config = write_config(
        tmp / "c.toml",
        emulator.url,
        tmp / "b.sock",
        tmp / "state",
        profiles=(),
        broker={"socket_mode": "0666", **(broker or {})},
        apps={
            "shop": {"allow_users": [NOBODY], "proxy_cookie": "__Host-geins", **(app or {})},
            "outlet": {"allow_users": [READER]},
        },
    )
    extra = remote_toml(
        "apps.taped",
        emulator.url,
        merchant_api_url=recorder.url,
        allow_users=[NOBODY],
        proxy_cookie="taped",
    )
    try:
        with started(config, tmp, emulator, extra + proxy_toml(port)) as daemon:
            yield SessionStack(
                daemon, emulator, recorder, tmp / "b.sock", tmp / "b.merchant.sock", port
            )
    finally:
        recorder.close()
