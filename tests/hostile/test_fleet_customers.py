"""Attacks on customer sessions in the fleet store: whoever reaches a password-less Redis
writes every key. Real redis-server, real daemons, one emulator."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from geins_broker_client.errors import BrokerError
from tests.fleet.support import Fleet, RedisServer, fleet_fixtures, jti_rotations
from tests.support import EmulatorProcess

TOKEN_TTL = 10.0
SHOP: dict[str, Any] = {"jitter": 0, "refresh_at": 0.9, "active_for": 1}
BASE = "geins-broker:{cs/shop}"


redis, emulator = fleet_fixtures(TOKEN_TTL)


@pytest.fixture
def fleet(short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess) -> Iterator[Fleet]:
    nodes = Fleet(
        short_tmp,
        emulator,
        redis.url,
        nodes=2,
        profiles=(),
        apps={"shop": SHOP},
        lease_ttl=4.0,
        command_timeout=1.5,
    )
    try:
        yield nodes
    except BaseException:
        print(nodes.logs()[-20000:])
        raise
    finally:
        nodes.close()


def token(fleet: Fleet, node: int, handle: str, min_valid: float = 0) -> str:
    with fleet.client(node) as client:
        return client.session_token("shop", handle, min_valid=min_valid).token


def session_key(redis: RedisServer) -> str:
    keys = list(redis.command("KEYS", f"{BASE}:s:*"))
    assert len(keys) == 1, keys
    return str(keys[0])


@pytest.mark.parametrize("filed_as", ["its own", "higher"])
def test_a_replayed_old_record_is_refused(fleet: Fleet, redis: RedisServer, filed_as: str) -> None:
    """A record saved at generation 1 and put back after the session rotated (under its
    own generation, or under a higher one than the store's): neither node goes back to
    it; the node that refreshes next refuses it, rotates from what it holds and writes
    that over the replay."""
    with fleet.client(0) as client:
        handle = client.session_register("shop", "a@example.com", "pw-1234").handle
    old = token(fleet, 1, handle)  # n1 now holds generation 1 too
    key = session_key(redis)
    assert redis.command("COPY", key, "saved") == 1
    time.sleep(1.1)
    rotated = token(fleet, 0, handle, min_valid=TOKEN_TTL - 1)  # generation 2
    assert rotated != old
    assert token(fleet, 1, handle, min_valid=TOKEN_TTL - 1) == rotated  # n1 adopts it
    assert redis.command("HGET", key, "gen") == "2"

    assert redis.command("COPY", "saved", key, "REPLACE") == 1
    if filed_as == "higher":
        redis.command("HSET", key, "gen", "100")
    for i in (0, 1):  # from memory: what they hold
        assert token(fleet, i, handle) == rotated
    time.sleep(1.1)
    fresh = token(fleet, 1, handle, min_valid=TOKEN_TTL - 1)  # n1 refreshes: refuses
    assert fresh not in (old, rotated)
    assert jti_rotations(fresh) == (jti_rotations(old)[0], 2)
    assert token(fleet, 0, handle, min_valid=TOKEN_TTL - 1) == fresh  # n0 adopts it
    assert redis.command("HGET", key, "gen") == "3"
    assert "customer_record_refused" in fleet.logs()


def test_garbage_in_the_store_keeps_every_node_alive(fleet: Fleet, redis: RedisServer) -> None:
    """Every kind of value a customer session keeps in Redis, overwritten with garbage
    (and a lease that never expires, a forged announcement): the nodes stay up, the
    sessions not touched keep working, the broken one answers an error."""
    handles: dict[str, str] = {}  # the session's key -> its handle
    with fleet.client(0) as client:
        for n in range(3):
            before = set(redis.command("KEYS", f"{BASE}:s:*"))
            handle = client.session_register("shop", f"g{n}@example.com", "pw").handle
            (key,) = set(redis.command("KEYS", f"{BASE}:s:*")) - before
            handles[key] = handle
    for handle in handles.values():
        token(fleet, 1, handle)
    broken, leased, untouched = sorted(handles)
    redis.command("SET", leased.replace(":s:", ":l:"), "evil x")  # a lease without expiry
    redis.command("HSET", broken, "gen", "1e+20", "rem", "x", "created", "nan")
    redis.command("ZADD", f"{BASE}:used", "0", "not-an-id", "1", "../../x")
    redis.command("ZADD", f"{BASE}:short", "-5", "z" * 64)
    redis.command("SET", "geins-broker:customers:store-key", "garbage")
    redis.command("PUBLISH", "geins-broker:customers:ended", "shop " + "f" * 64)
    redis.command("PUBLISH", "geins-broker:customers:ended", "\x1b[2J" * 50)
    time.sleep(1.1)
    pids = [d.process.pid for d in fleet.daemons.values()]
    results: dict[tuple[str, int], str] = {}
    for key, handle in handles.items():
        for i in (0, 1):
            try:
                results[key, i] = token(fleet, i, handle, min_valid=TOKEN_TTL - 1)
            except BrokerError as exc:
                results[key, i] = f"{type(exc).__name__}: {exc}"
    with fleet.client(0) as client, contextlib.suppress(BrokerError):
        client.sessions("shop")
    assert [d.process.pid for d in fleet.daemons.values() if d.process.poll() is None] == pids
    # The untouched session rotated once, and both nodes serve its new bearer.
    assert results[untouched, 0] == results[untouched, 1], results
    assert jti_rotations(results[untouched, 0])[1] == 1
    # The broken one and the one whose lease never expires answer errors, not bearers.
    for key in (broken, leased):
        assert results[key, 0].startswith(("InternalError", "Unavailable")), results[key, 0]
