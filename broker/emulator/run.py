"""`geins-broker emulator`: the emulator as a process of its own."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass

import trio

from . import Emulator


@dataclass(frozen=True)
class EmulatorOptions:
    host: str
    port: int
    account: str
    environment: str
    api_key: str
    users: dict[str, str]
    token_ttl: float
    refresh_ttl: float
    refresh_grace: float


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def parse_user(value: str) -> tuple[str, str]:
    username, sep, password = value.partition(":")
    if not sep or not username:
        raise ValueError("--user wants USERNAME:PASSWORD")
    return username, password


async def serve(options: EmulatorOptions) -> None:
    emulator = Emulator(
        account=options.account,
        environment=options.environment,
        api_key=options.api_key,
        users=options.users,
        token_ttl=options.token_ttl,
        refresh_ttl=options.refresh_ttl,
        refresh_grace=options.refresh_grace,
        host=options.host,
        port=options.port,
    )
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            url = await emulator.start(nursery)
            print(f"listening on {url}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(options: EmulatorOptions) -> int:
    try:
        trio.run(serve, options)
    except OSError as exc:
        where = f"{options.host}:{options.port}"
        print(f"geins-broker emulator: cannot listen on {where}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0
