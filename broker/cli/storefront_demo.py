"""`geins-broker demo --storefront`: a storefront whose customers log in through the
broker, on one machine, no Geins account needed.

Starts the emulator (short bearers), the daemon with an `[apps.shop]` section, and the
example storefront (clients/node/examples/storefront, on Node), then prints the URL to
open in a browser. Builds the Node client and installs the example's dependencies first
when they are missing (from their lockfiles). Ctrl-C stops everything.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import trio

from broker.cli.demo_steps import (
    read_listening,
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

#: The Node client and the example, in a source checkout.
NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
EXAMPLE = NODE_CLIENT / "examples" / "storefront"
#: Orders the demo customer has, so the account page shows some.
DEMO_ORDERS = 3


def missing_node() -> str | None:
    """Why the example cannot run here, or None."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "the storefront demo needs Node 18 or newer and npm on PATH"
    if not (EXAMPLE / "server.mjs").is_file():
        return (
            f"the example storefront is not here ({EXAMPLE}): run the demo from a source checkout"
        )
    return None


async def _prepare() -> None:
    """Build the client and install the example's dependencies if they are missing."""
    steps: list[tuple[Path, list[str]]] = []
    if not (NODE_CLIENT / "node_modules").is_dir():
        steps.append((NODE_CLIENT, ["npm", "ci", "--no-audit", "--no-fund"]))
    if not (NODE_CLIENT / "dist" / "index.js").is_file():
        steps.append((NODE_CLIENT, ["npm", "run", "build", "--silent"]))
    if not (EXAMPLE / "node_modules" / "geins-broker-client").exists():
        steps.append((EXAMPLE, ["npm", "ci", "--no-audit", "--no-fund"]))
    for cwd, command in steps:
        say(f"in {cwd}: {' '.join(command)}")
        await trio.run_process(command, cwd=cwd)


async def _start_storefront(workdir: Path, emulator_url: str) -> tuple[trio.Process, str]:
    env = {
        "PATH": str(Path(shutil.which("node") or "node").parent),
        "GEINS_BROKER_SOCKET": str(workdir / "broker.sock"),
        "MERCHANT_API_URL": f"{emulator_url}/graphql",
        "GEINS_API_KEY": "demo-api-key",
        "HOST": "127.0.0.1",
        "PORT": "0",
    }
    process = await trio.lowlevel.open_process(
        ["node", "server.mjs"],
        cwd=EXAMPLE,
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    return process, await read_listening(process, "the example storefront", 20)


async def _give_orders(emulator_url: str) -> None:
    async with httpx.AsyncClient() as http:
        body = json.dumps({"username": DEMO_USER, "count": DEMO_ORDERS})
        await http.post(f"{emulator_url}/_emulator/orders", content=body)


async def _demo(workdir: Path, token_ttl: float) -> None:
    await _prepare()
    emulator, url = await start_emulator(token_ttl)
    say(f"emulator listening on {url} (bearer tokens live {token_ttl:g} s)")
    await _give_orders(url)
    daemon = await start_daemon(write_config(workdir, "apps.shop", url))
    storefront: trio.Process | None = None
    try:
        client = TrioClient(workdir / "broker.sock")
        await wait_for_daemon(client)
        await client.aclose()
        storefront, shop_url = await _start_storefront(workdir, url)
        say(f"the example storefront is at {shop_url}")
        print(
            f"\n    open {shop_url} in a browser\n"
            f"    log in as {DEMO_USER} / {DEMO_PASSWORD} (or register a new customer),\n"
            "    then: My account, Fan-out (20 Merchant API calls per page), Log out.\n"
            f"    The broker's socket: {workdir / 'broker.sock'} "
            "(geins-broker sessions ... with GEINS_BROKER_SOCKET set to it)\n",
            flush=True,
        )
        say("press Ctrl-C to stop")
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    finally:
        with trio.CancelScope(shield=True):
            say("stopping the storefront, the daemon and the emulator")
            if storefront is not None:
                await stop(storefront)
            await stop(daemon)
            await stop(emulator)


def main(token_ttl: float = 20.0) -> int:
    why = missing_node()
    if why is not None:
        print(f"geins-broker demo --storefront: {why}", file=sys.stderr)
        return 1
    return run_in_workdir("gb-shop-", _demo, token_ttl)
