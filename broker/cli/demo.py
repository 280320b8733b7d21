"""`geins-broker demo`: the whole product on one machine, no Geins account needed.

Starts the emulator with a short bearer lifetime, starts the daemon against it (both as
the real `geins-broker` processes), logs the demo user in through the client library,
reads the user once through the Merchant API proxy (printing the curl command that
does it), prints once the commands to try from another terminal (with this demo's
socket), then each token the daemon rotates in, until Ctrl-C stops everything cleanly.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import trio

from broker.cli.demo_steps import (
    run_in_workdir,
    say,
    start_daemon,
    start_emulator,
    stop,
    wait_for_daemon,
    write_config,
)
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from geins_broker_client.trio_client import TrioClient


def try_these(socket: Path) -> str:
    """The commands a newcomer can paste into another terminal while the demo runs."""
    bin_dir = Path(sys.executable).parent
    exports = [f"GEINS_BROKER_SOCKET={shlex.quote(str(socket))}"]
    program, python = "geins-broker", "python"
    if not (bin_dir / "geins-broker").exists():  # run as `python -m broker`, not installed
        program, python = f"{shlex.quote(sys.executable)} -m broker", shlex.quote(sys.executable)
    elif shutil.which("geins-broker") != str(bin_dir / "geins-broker"):
        exports.append(f"PATH={shlex.quote(str(bin_dir))}:$PATH")  # the venv's, first
    one_liner = (
        "from geins_broker_client import Client; "
        f"t = Client({json.dumps(str(socket))}).token(); "
        'print(t.profile, round(t.expires_in()), "s left")'
    )
    commands = [
        (f"export {' '.join(exports)}", ""),
        (f"{program} status", "every profile's session"),
        (f"{program} token", "the bearer token itself"),
        (f"{program} user", "who the session belongs to"),
        (f"{program} watch", "each rotation as it happens"),
        (f"{program} metrics", "Prometheus metrics"),
        (f"{program} status --check; echo $?", "health as an exit code"),
        (f"{python} -c {shlex.quote(one_liner)}", ""),
    ]
    width = max(len(c) for c, note in commands if note)
    return "\n".join(
        f"    {command.ljust(width)}   # {note}" if note else f"    {command}"
        for command, note in commands
    )


async def _watch(client: TrioClient) -> None:
    async for event in client.watch():
        if event.token is None:
            say(f"session: {event.event.replace('_', ' ')}")
            continue
        left = event.token.expires_in()
        expires = time.strftime("%H:%M:%S", time.localtime(event.token.expires_at))
        say(f"token for {event.token.profile}: expires at {expires} (in {left:.0f} s)")


async def _read_user_through_the_proxy(proxy_socket: Path) -> None:
    """Show the Merchant API proxy: any HTTP client, no token in sight."""
    query = json.dumps({"query": "{ getUser { email } }"}, separators=(",", ":"))
    command = [
        "curl",
        "-sS",
        "--unix-socket",
        str(proxy_socket),
        "-H",
        "Content-Type: application/json",
        "-d",
        query,
        "http://geins/graphql",
    ]
    say("read the user through the Merchant API proxy (no token needed):")
    print("    " + shlex.join(command), flush=True)
    if shutil.which("curl") is not None:
        done = await trio.run_process(command, capture_stdout=True, check=False)
        answer = done.stdout.decode(errors="replace").strip()
    else:  # the same request without curl
        transport = httpx.AsyncHTTPTransport(uds=str(proxy_socket))
        async with httpx.AsyncClient(transport=transport) as http:
            reply = await http.post(
                "http://geins/graphql",
                content=query,
                headers={"Content-Type": "application/json"},
            )
            answer = reply.text
    say(f"-> {answer}")


async def _demo(workdir: Path, token_ttl: float) -> None:
    emulator, url = await start_emulator(token_ttl)
    say(f"emulator listening on {url} (bearer tokens live {token_ttl:g} s)")
    daemon = await start_daemon(write_config(workdir, "profiles.default", url))
    try:
        client = TrioClient(workdir / "broker.sock")
        await wait_for_daemon(client)
        session = await client.login(DEMO_USER, DEMO_PASSWORD)
        say(f"logged in as {session.username}; the daemon rotates the token from here on")
        await _read_user_through_the_proxy(workdir / "merchant.sock")
        say("try these from another terminal:")
        print(try_these(workdir / "broker.sock"), flush=True)
        say("press Ctrl-C to stop")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch, client)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        await client.aclose()
    finally:
        with trio.CancelScope(shield=True):
            say("stopping the daemon and the emulator")
            await stop(daemon)
            await stop(emulator)
    say(f"stopped (daemon exit {daemon.returncode}, emulator exit {emulator.returncode})")


def main(token_ttl: float = 20.0) -> int:
    return run_in_workdir("gb-demo-", _demo, token_ttl)
