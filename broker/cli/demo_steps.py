"""The start-up and shut-down steps every `geins-broker demo` shares: the emulator and
the daemons as real `geins-broker` child processes, a config section on the emulator,
waiting for a daemon, stopping a child, and the temporary directory the demo lives in.

Each child starts in a session of its own, so Ctrl-C reaches the demo only and the demo
stops the children itself, in order.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import trio

from geins_broker_client import BrokerError
from geins_broker_client.trio_client import TrioClient

COMMAND = [sys.executable, "-m", "broker"]


def say(text: str) -> None:
    """One line of the demo's narration, time-stamped."""
    print(f"{time.strftime('%H:%M:%S')}  {text}", flush=True)


def remote_section(section: str, emulator_url: str) -> str:
    """A `[profiles.NAME]` or `[apps.NAME]` section on the emulator (its demo account)."""
    return (
        f"[{section}]\n"
        'account = "demo"\n'
        'api_key = "demo-api-key"\n'
        f'auth_service_url = "{emulator_url}"\n'
        f'merchant_api_url = "{emulator_url}"\n'
    )


def write_config(workdir: Path, section: str, emulator_url: str) -> Path:
    """The config of a one-daemon demo in `workdir`: its socket and state there, and one
    `section` (a profile or an app) on the emulator's Swedish channel."""
    path = workdir / "config.toml"
    path.write_text(
        f"""[broker]
socket = "{workdir / "broker.sock"}"
state_dir = "{workdir / "state"}"

{remote_section(section, emulator_url)}channel_id = "1|se"
language_id = "sv-SE"
market_id = "se"
"""
    )
    return path


async def read_listening(process: trio.Process, what: str, seconds: float) -> str:
    """The address in the child's first stdout line ("listening on ADDRESS"), read within
    `seconds`."""
    assert process.stdout is not None
    line = b""
    with trio.fail_after(seconds):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                raise RuntimeError(f"{what} exited before it was listening")
            line += chunk
    return line.decode().strip().removeprefix("listening on ")


async def start_emulator(token_ttl: float) -> tuple[trio.Process, str]:
    """The emulator (bearers living `token_ttl` seconds) and its URL once it listens."""
    process = await trio.lowlevel.open_process(
        [*COMMAND, "emulator", "--token-ttl", f"{token_ttl:g}"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    return process, await read_listening(process, "the emulator", 15)


async def start_daemon(config: Path, stderr: IO[bytes] | None = None) -> trio.Process:
    """`geins-broker serve` on `config`; `wait_for_daemon` says when it answers."""
    return await trio.lowlevel.open_process(
        [*COMMAND, "serve", "--config", str(config)], start_new_session=True, stderr=stderr
    )


async def wait_for_daemon(client: TrioClient) -> None:
    with trio.fail_after(15):
        while True:
            try:
                await client.hello("geins-broker demo")
                return
            except BrokerError:
                await trio.sleep(0.05)


async def stop(process: trio.Process) -> None:
    """SIGTERM, then SIGKILL after 10 s: a child that hangs does not hang the demo."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


def run_in_workdir(prefix: str, demo: Callable[..., Awaitable[None]], *args: Any) -> int:
    """`demo(workdir, *args)` under trio in a fresh private directory of a short path
    (sockets live there), removed afterwards; Ctrl-C before the demo's own handler is
    in place is exit 130."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))  # mkdtemp makes it 0700
    try:
        trio.run(demo, workdir, *args)
    except KeyboardInterrupt:
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0
