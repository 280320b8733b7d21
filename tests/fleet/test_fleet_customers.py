"""Customer sessions in fleet mode: three real daemons, one redis-server, one emulator.

Sessions are created on one node and used on all three; each round asks every node at
once for a bearer with more life than the held one has left, so the three race for the
session's one refresh. The emulator counts refresh requests and writes each session's
rotation count into its bearer's jti: one refresh per rotation fleet-wide means the
requests it received equal the rotations the sessions made, and every node serves the
same bearer afterwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from geins_broker_client.errors import UnknownSession
from tests.fleet.support import (
    CLEAR_JWT,
    Fleet,
    RedisServer,
    fleet_fixtures,
    jti_rotations,
    refresh_requests,
)
from tests.support import EmulatorProcess, wait_until

TOKEN_TTL = 10.0
#: More than a bearer has left once a round's pause is over: every node wants a new
#: one; less than it has while the three nodes take their turns at the lease.
MIN_VALID = TOKEN_TTL / 2
SESSIONS = 1000
ROUNDS = 2
#: Proactive refresh mostly left out (sessions count as idle a second after their last
#: use, and rotate late), so the rounds make the rotations.
SHOP: dict[str, Any] = {
    "jitter": 0,
    "refresh_at": 0.9,
    "active_for": 1,
    "login_burst_per_uid": 5000,
}


redis, emulator = fleet_fixtures(TOKEN_TTL)


def in_threads(count: int, work: Callable[[int], object]) -> None:
    """`work(0..count-1)` in threads at once; the first failure is raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]


def create_sessions(fleet: Fleet, node: int, count: int, clients: int = 8) -> list[str]:
    """`count` customers registered on `node`, a session each; their handles in order."""
    handles: dict[int, str] = {}

    def work(c: int) -> None:
        with fleet.client(node) as client:
            for n in range(c, count, clients):
                created = client.session_register("shop", f"c{n}@example.com", "pw-1234")
                handles[n] = created.handle

    in_threads(clients, work)
    return [handles[n] for n in range(count)]


def bearers(fleet: Fleet, node: int, handles: list[str], min_valid: float = 0) -> list[str]:
    with fleet.client(node) as client:
        return [client.session_token("shop", h, min_valid=min_valid).token for h in handles]


def served_everywhere(fleet: Fleet, handles: list[str]) -> list[str]:
    """Each session's bearer as n0, n1 and n2 serve it, asked one right after the
    other (with a second to spare, so none runs out in between): the same on all."""
    clients = [fleet.client(i) for i in (0, 1, 2)]
    try:
        served = []
        for handle in handles:
            tokens = [c.session_token("shop", handle, min_valid=1).token for c in clients]
            assert tokens[1] == tokens[0] and tokens[2] == tokens[0], "nodes serve other bearers"
            served.append(tokens[0])
        return served
    finally:
        for client in clients:
            client.close()


def test_one_refresh_per_rotation_across_three_nodes_with_1000_sessions(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    # Generous store timeouts: the test shares two cores with everything else.
    fleet = Fleet(
        short_tmp,
        emulator,
        redis.url,
        profiles=(),
        apps={"shop": SHOP},
        lease_ttl=6.0,
        command_timeout=2.0,
    )
    try:
        began = time.monotonic()
        first = refresh_requests(emulator)
        handles = create_sessions(fleet, 0, SESSIONS)
        # Created on n0, used on n1 and n2: one session each, wherever it is asked for.
        families = [jti_rotations(b)[0] for b in served_everywhere(fleet, handles)]
        assert len(set(families)) == SESSIONS
        for round_ in range(1, ROUNDS + 1):
            # The three nodes race for every session's refresh, in the same order.
            time.sleep(TOKEN_TTL - MIN_VALID + 0.1)
            in_threads(3, lambda i: bearers(fleet, i, handles, MIN_VALID))
            rotations = [jti_rotations(b) for b in served_everywhere(fleet, handles)]
            assert [family for family, _ in rotations] == families
            assert min(count for _, count in rotations) >= round_
        # Every refresh request the emulator received advanced a session by one: none
        # was made twice for one rotation, none was refused as a reused token.
        assert refresh_requests(emulator) - first == sum(count for _, count in rotations)
        print(f"{SESSIONS} sessions, {ROUNDS} rounds: {time.monotonic() - began:.1f} s")
        values = redis.scan_values()
        for key, value in values.items():
            assert not CLEAR_JWT.search(value), f"a JWT in clear under {key}"
            assert b"example.com" not in value and "example.com" not in key
            for handle in handles[:50]:
                assert handle not in key and handle.encode() not in value

        # A logout on one node ends the session on every node, at once.
        with fleet.client(1) as client:
            client.session_logout("shop", handles[0])
        for i in (0, 2):
            wait_until(partial(gone, fleet, i, handles[0]), 5, f"n{i} ends the session")
        # "Log out everywhere" on one node ends the customer's sessions on every node.
        with fleet.client(0) as client:
            second = client.session_login("shop", "c1@example.com", "pw-1234").handle
        assert served_everywhere(fleet, [second])
        with fleet.client(2) as client:
            assert client.session_end("shop", "c1@example.com") == 2
        for i in (0, 1):
            for handle in (handles[1], second):
                wait_until(partial(gone, fleet, i, handle), 5, f"n{i} ends them all")
        assert served_everywhere(fleet, handles[2:10])
    except BaseException:
        print(fleet.logs()[-20000:])
        raise
    finally:
        fleet.close()


def gone(fleet: Fleet, node: int, handle: str) -> bool:
    try:
        bearers(fleet, node, [handle])
    except UnknownSession:
        return True
    return False
