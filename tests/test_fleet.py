"""Fleet mode over real processes: three daemons, one redis-server, one emulator.

Rotations are compressed to seconds (tokens of a few seconds, rotated at half their
life). The emulator writes each session's rotation count into its bearer's jti, so
"exactly one refresh per rotation" is checked from the tokens the nodes serve and the
emulator's own request counts: every refresh request it answered advanced a session
(none wasted, none rejected), and no session rotated more often than its period allows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from geins_broker_client.errors import Unavailable
from tests.fleet_support import (
    CuttableProxy,
    Fleet,
    RedisServer,
    fleet_env,
    jti_rotations,
    wait_until,
)
from tests.support import EmulatorProcess

TOKEN_TTL = 6.0
REFRESH_AT = 0.5
#: The shortest rotation period the jitter allows: 0.45 of the lifetime.
MIN_PERIOD = TOKEN_TTL * (REFRESH_AT - 0.05)


@pytest.fixture
def redis(short_tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(short_tmp)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def emulator(short_tmp: Path) -> Iterator[EmulatorProcess]:
    with fleet_env(short_tmp, token_ttl=TOKEN_TTL) as emu:
        yield emu


def refresh_requests(emulator: EmulatorProcess) -> int:
    """Refresh requests the emulator received (a refresh is `GET /login` with the
    refresh token), answered or refused alike."""
    return int(emulator.control("GET", "stats")["counts"].get("GET /login", 0))


def same_tokens_everywhere(fleet: Fleet, nodes: list[int]) -> dict[str, str]:
    first = fleet.tokens(nodes[0])
    for i in nodes[1:]:
        assert fleet.tokens(i) == first, f"node n{i} serves other tokens than n{nodes[0]}"
    return first


def refresh_tokens_on_disk(fleet: Fleet) -> set[str]:
    found = set()
    for path in fleet.workdir.glob("n*/state/*.session.json"):
        token = json.loads(path.read_text()).get("refresh_token")
        if token:
            found.add(token)
    return found


def assert_nothing_in_clear(redis: RedisServer, secrets_: set[str]) -> None:
    values = redis.scan_values()
    assert values, "the fleet wrote nothing to Redis"
    for key, value in values.items():
        assert b"eyJ" not in value, f"a JWT in clear under {key}"
        for secret in secrets_:
            assert secret.encode() not in value, f"a refresh token in clear under {key}"


def test_one_refresh_per_rotation_across_three_nodes(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    profiles = tuple(f"p{i}" for i in range(20))
    fleet = Fleet(short_tmp, emulator, redis.url, profiles=profiles, refresh_at=REFRESH_AT)
    try:
        fleet.login_all(0)
        # A login on n0 is served by every node.
        wait_until(
            lambda: all(s["state"] == "active" for i in (1, 2) for s in fleet.status(i)),
            5,
            "n1 and n2 adopt the logins made on n0",
        )
        start_tokens = same_tokens_everywhere(fleet, [0, 1, 2])
        start = {p: jti_rotations(t) for p, t in start_tokens.items()}
        began = time.monotonic()
        base_total = refresh_requests(emulator)
        time.sleep(3 * TOKEN_TTL * REFRESH_AT + 1)
        tokens = wait_until(lambda: _settled(fleet), 5, "every node serves the same tokens")
        elapsed = time.monotonic() - began
        total = refresh_requests(emulator)
        rotations = {}
        for profile, token in tokens.items():
            family, count = jti_rotations(token)
            assert family == start[profile][0], f"{profile}: the session was replaced"
            rotations[profile] = count - start[profile][1]
        assert min(rotations.values()) >= 2, rotations
        assert max(rotations.values()) <= math.ceil(elapsed / MIN_PERIOD) + 1, rotations
        # Every refresh request the emulator answered advanced a session by one: none
        # was made twice for one rotation, none was refused as a reused token.
        assert total - base_total == sum(rotations.values())
        status = fleet.status(1)
        assert {s["state"] for s in status} == {"active"}
        assert all(s["fleet"]["healthy"] for s in status)
        assert status[0]["fleet"]["nodes"] == ["n0", "n1", "n2"]
        assert_nothing_in_clear(redis, refresh_tokens_on_disk(fleet))
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.close()


def _settled(fleet: Fleet) -> dict[str, str] | None:
    tokens = [fleet.tokens(i) for i in (0, 1, 2)]
    return tokens[0] if tokens[0] == tokens[1] == tokens[2] else None


def test_logout_and_login_apply_fleet_wide(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=2)
    try:
        fleet.login_all(1)
        wait_until(lambda: fleet.status(0)[0]["state"] == "active", 5, "n0 adopts the login")
        with fleet.client(0) as client:
            client.logout("default")
        wait_until(lambda: fleet.status(1)[0]["state"] == "logged_out", 5, "n1 adopts the logout")
        fleet.login_all(0)
        wait_until(lambda: fleet.status(1)[0]["state"] == "active", 5, "n1 adopts the new login")
        assert fleet.tokens(0) == fleet.tokens(1)
    finally:
        fleet.close()


def test_watch_on_every_node_sees_rotations_by_any_node(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=2, refresh_at=REFRESH_AT)
    try:
        fleet.login_all(0)
        wait_until(lambda: fleet.status(1)[0]["state"] == "active", 5, "n1 adopts the login")
        seen: dict[int, list[str]] = {0: [], 1: []}
        clients = {i: fleet.client(i) for i in (0, 1)}
        streams = {i: clients[i].watch("default") for i in (0, 1)}
        for _ in range(3):
            for i in (0, 1):
                event = next(streams[i])
                assert event.token is not None
                seen[i].append(event.token.token)
        assert seen[0] == seen[1]
        assert len(set(seen[0])) == 3
        for client in clients.values():
            client.close()
    finally:
        fleet.close()


def test_a_partitioned_node_serves_while_valid_then_names_the_store(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    proxy = CuttableProxy(redis.port)
    fleet = Fleet(
        short_tmp,
        emulator,
        lambda i: proxy.url if i == 1 else redis.url,
        nodes=2,
        refresh_at=REFRESH_AT,
    )
    try:
        fleet.login_all(0)
        wait_until(lambda: fleet.status(1)[0]["state"] == "active", 5, "n1 adopts the login")
        base_total = refresh_requests(emulator)
        proxy.cut()

        # n0 keeps rotating; n1 never refreshes without the lease, and says why once its
        # held token has run out.
        def n1_names_the_store() -> bool:
            with fleet.client(1) as client:
                try:
                    client.token("default")
                except Unavailable as exc:
                    return "fleet store" in str(exc)
            return False

        wait_until(n1_names_the_store, TOKEN_TTL + 8, "n1 answers upstream_unavailable")
        status = fleet.status(1)[0]
        assert status["fleet"]["healthy"] is False
        proxy.heal()
        tokens = wait_until(
            lambda: (t := fleet.tokens(1)) == fleet.tokens(0) and t, 15, "n1 catches up"
        )
        _, rotations = jti_rotations(tokens["default"])
        total = refresh_requests(emulator)
        assert total - base_total <= rotations  # nothing wasted while partitioned
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.close()
        proxy.close()
