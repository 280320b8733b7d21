"""A daemon with its Merchant API proxy on, as real processes, for the tests that call
the proxy from other processes and uids.

The directory is made 0755 so that other uids may reach the sockets in it: the
sockets' own modes and the profiles' ACLs decide who gets in, as in production.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    DaemonProcess,
    EmulatorProcess,
    call,
    free_port,
    running,
    write_config,
)

#: The GraphQL body the tests send through the proxy: the logged-in user's email.
GET_USER = json.dumps({"query": "{ getUser { email } }"})


@dataclass(frozen=True)
class ProxyStack:
    emulator: EmulatorProcess
    daemon: DaemonProcess
    broker_socket: Path
    proxy_socket: Path
    port: int
    state_dir: Path

    def login(self, profile: str = "default") -> None:
        answer = call(
            self.broker_socket,
            op="login",
            profile=profile,
            username=DEMO_USER,
            password=DEMO_PASSWORD,
        )
        assert answer["ok"], answer


def remote_toml(section: str, emulator_url: str, **settings: Any) -> str:
    """One `[profiles.NAME]` or `[apps.NAME]` section on the emulator, `settings` added
    (a `merchant_api_url` there puts another upstream in front of the Merchant API)."""
    merchant = settings.pop("merchant_api_url", emulator_url)
    lines = [
        f"[{section}]",
        'account = "demo"',
        'api_key = "demo-api-key"',
        f'auth_service_url = "{emulator_url}"',
        f'merchant_api_url = "{merchant}"',
        *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),
    ]
    return "\n".join(lines) + "\n"


def proxy_toml(port: int, **settings: Any) -> str:
    """The `[proxy]` section: loopback TCP on `port`, `settings` added."""
    lines = [
        "[proxy]",
        f'tcp = "127.0.0.1:{port}"',
        *(f"{k} = {json.dumps(v)}" for k, v in settings.items()),
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def started(
    config: Path, tmp: Path, emulator: EmulatorProcess, extra_toml: str
) -> Iterator[DaemonProcess]:
    """The daemon of `config`, `extra_toml` appended to it, up and ready; it and the
    emulator are stopped afterwards."""
    with config.open("a") as toml:
        toml.write(extra_toml)
    daemon = DaemonProcess(config, tmp, wait_ready=False)
    with running(daemon, emulator):
        daemon.wait_ready()
        yield daemon


@contextlib.contextmanager
def proxy_stack(
    tmp: Path, *, shared_for: int, proxy: Mapping[str, Any] | None = None
) -> Iterator[ProxyStack]:
    """A daemon whose proxy listens on loopback TCP and on a Unix socket anyone may
    connect to, `proxy` added to its settings; profile `default` is the daemon's uid's
    own, profile `shared` is readable by the uid `shared_for`. Bearers live 2 minutes;
    nothing is logged in."""
    tmp.chmod(0o755)
    emulator = EmulatorProcess("--token-ttl", "120")
    port = free_port()
    config = write_config(
        tmp / "c.toml",
        emulator.url,
        tmp / "broker.sock",
        tmp / "state",
        profiles=("default",),
        broker={"socket_mode": "0666"},
    )
    extra = remote_toml("profiles.shared", emulator.url, allow_users=[shared_for])
    extra += proxy_toml(port, **(proxy or {}))
    with started(config, tmp, emulator, extra) as daemon:
        yield ProxyStack(
            emulator, daemon, tmp / "broker.sock", tmp / "merchant.sock", port, tmp / "state"
        )
