"""`geins-broker demo --fleet N`: fleet mode on one machine, no Geins account needed.

Starts a private redis-server (a Unix socket in a temporary directory, no persistence),
the emulator with short-lived bearers, and N daemons (nodes n0, n1, ...) sharing one
session through Redis, sealed with a key made for the demo. It logs the demo user in
on n0, then prints one line per rotation: which node rotated, how long until every node
served the new token, and how many refreshes Geins has seen against how many rotations
(the goal: exactly one per rotation).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

from broker.cli.demo_steps import (
    remote_section,
    run_in_workdir,
    say,
    start_daemon,
    start_emulator,
    stop,
    wait_for_daemon,
)
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from geins_broker_client import BrokerError, calls
from geins_broker_client.trio_client import TrioClient


def _node_config(workdir: Path, i: int, emulator_url: str, redis_socket: Path) -> Path:
    node = workdir / f"n{i}"
    node.mkdir()
    path = node / "config.toml"
    path.write_text(
        f"""[broker]
socket = "{node / "broker.sock"}"
state_dir = "{node / "state"}"
key_file = "{workdir / "fleet.key"}"

[cluster]
url = "unix://{redis_socket}"
node = "n{i}"
lease_ttl = 5
poll_interval = 1

{remote_section("profiles.default", emulator_url)}"""
    )
    return path


async def _start_redis(workdir: Path) -> tuple[trio.Process, Path]:
    if shutil.which("redis-server") is None:
        raise RuntimeError(
            "redis-server is not installed (Debian: apt-get install -y redis-server)"
        )
    sock = workdir / "redis.sock"
    process = await trio.lowlevel.open_process(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    with trio.fail_after(10):
        while not sock.exists():  # noqa: ASYNC110 - another process makes the file
            await trio.sleep(0.02)
    return process, sock


def _refreshes(emulator_url: str) -> int:
    with urllib.request.urlopen(f"{emulator_url}/_emulator/stats", timeout=5) as answer:  # noqa: S310 - loopback
        counts = json.loads(answer.read())["counts"]
    return int(counts.get("GET /login", 0))


async def _committed_by(client: TrioClient) -> tuple[int, str]:
    raw: dict[str, Any] = await client.call(calls.status(), lambda message: message)
    fleet = raw["profiles"][0].get("fleet") or {}
    return int(fleet.get("generation") or 0), str(fleet.get("committed_by") or "?")


async def _follow(
    clients: list[TrioClient], emulator_url: str, *, task_status: trio.TaskStatus[None]
) -> None:
    """One line per rotation, once every node serves it."""
    seen: dict[str, dict[int, float]] = {}
    done: set[str] = set()
    started = time.monotonic()
    first_refreshes = await trio.to_thread.run_sync(_refreshes, emulator_url)
    first_generation = -1

    async def watch(i: int) -> None:
        nonlocal first_generation
        async for event in clients[i].watch():
            if event.token is None:
                if first_generation >= 0:  # not the moment before a node adopts the login
                    say(f"n{i}: session {event.event.replace('_', ' ')}")
                continue
            token = event.token.token
            seen.setdefault(token, {})[i] = time.monotonic()
            if len(seen[token]) == len(clients) and token not in done:
                done.add(token)
                moments = seen[token].values()
                spread = (max(moments) - min(moments)) * 1000
                generation, node = await _committed_by(clients[0])
                if first_generation < 0:
                    first_generation = generation
                    say(f"generation {generation}: every node serves the login")
                    continue
                refreshes = await trio.to_thread.run_sync(_refreshes, emulator_url)
                rotations = generation - first_generation
                say(
                    f"generation {generation}: rotated by {node}; all {len(clients)} nodes "
                    f"serve it within {spread:.1f} ms; refreshes at Geins "
                    f"{refreshes - first_refreshes} for {rotations} rotations "
                    f"({time.monotonic() - started:.0f} s)"
                )

    async with trio.open_nursery() as nursery:
        for i in range(len(clients)):
            nursery.start_soon(watch, i)
        task_status.started()


async def _fleet_demo(workdir: Path, nodes: int, token_ttl: float, duration: float | None) -> None:
    key = workdir / "fleet.key"
    key.write_bytes(base64.b64encode(secrets.token_bytes(32)) + b"\n")
    key.chmod(0o600)
    redis, redis_socket = await _start_redis(workdir)
    say(f"redis-server on {redis_socket}")
    emulator, url = await start_emulator(token_ttl)
    say(f"emulator listening on {url} (bearer tokens live {token_ttl:g} s)")
    daemons: list[trio.Process] = []
    try:
        for i in range(nodes):
            config = _node_config(workdir, i, url, redis_socket)
            daemons.append(
                await start_daemon(config, stderr=(workdir / f"n{i}" / "daemon.log").open("ab"))
            )
        clients = [TrioClient(workdir / f"n{i}" / "broker.sock") for i in range(nodes)]
        for client in clients:
            await wait_for_daemon(client)
        say(f"{nodes} nodes up (n0..n{nodes - 1}), sharing profile 'default' through Redis")
        session = await clients[0].login(DEMO_USER, DEMO_PASSWORD)
        say(f"logged in as {session.username} on n0; every node serves the same session")
        with trio.open_signal_receiver(2, 15) as signals:  # SIGINT, SIGTERM
            async with trio.open_nursery() as nursery:
                await nursery.start(_follow, clients, url)
                if duration is not None:
                    nursery.cancel_scope.deadline = trio.current_time() + duration
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        for client in clients:
            await client.aclose()
    finally:
        with trio.CancelScope(shield=True):
            say("stopping the nodes, the emulator and redis-server")
            for process in (*daemons, emulator, redis):
                await stop(process)
    say("stopped")


def main(nodes: int, token_ttl: float, duration: float | None = None) -> int:
    try:
        return run_in_workdir("gb-fleet-", _fleet_demo, nodes, token_ttl, duration)
    except (RuntimeError, BrokerError) as exc:
        print(f"geins-broker demo: {exc}", file=sys.stderr)
        return 1
