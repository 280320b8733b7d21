"""`geins-broker emulator`: the emulator as a process of its own."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import trio

from broker.emulator.app import Emulator


@dataclass(frozen=True)
class EmulatorOptions:
    host: str
    port: int
    #: None: the demo user.
    users: dict[str, str] | None = None
    #: The ServiceConfig fields given on the command line; the rest keep its defaults.
    settings: dict[str, Any] = field(default_factory=dict)


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
        users=options.users, host=options.host, port=options.port, **options.settings
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
