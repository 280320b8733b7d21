"""Attacks on the fleet store: whoever reaches a password-less Redis writes its plain
fields. Real redis-server, real daemons, one emulator; short tokens (6 s)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from geins_broker_client.errors import BrokerError
from tests.fleet.support import Fleet, RedisServer, fleet_fixtures, jwt_claims, resp_command
from tests.support import EmulatorProcess, wait_until

TOKEN_TTL = 6.0
RECORD = "geins-broker:{default}:record"
LEASE = "geins-broker:{default}:lease"


redis, emulator = fleet_fixtures(TOKEN_TTL)


def serving(fleet: Fleet, i: int) -> str | None:
    """The bearer node `i` serves, None while it has none yet (adoption is under way)."""
    try:
        return fleet.tokens(i)["default"]
    except BrokerError:
        return None


def alive(fleet: Fleet) -> bool:
    return all(d.process.poll() is None for d in fleet.daemons.values())


def test_a_replayed_record_under_a_higher_generation_is_refused(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    """A sealed record saved earlier, published again as generation 100 with its times
    shifted to now after its bearer expired: no node serves that bearer, the session
    carries on, and the store does not keep the replay as the newest."""
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=2)
    try:
        fleet.login_all()
        saved = wait_until(lambda: serving(fleet, 1), 5, "n1 serves the login")
        assert redis.command("COPY", RECORD, "saved") == 1
        # Wait for the saved bearer to expire (rotations happen meanwhile).
        wait_until(
            lambda: time.time() > jwt_claims(saved)["exp"] + 1, 2 * TOKEN_TTL, "the bearer expires"
        )
        assert redis.command("COPY", "saved", RECORD, "REPLACE") == 1
        now_s, now_us = redis.command("TIME")
        redis.command(
            "HSET", RECORD, "gen", "100", "at", repr(time.time()), "ts", now_s, "tus", now_us
        )
        replayed_blob = redis.command("HGET", RECORD, "blob")
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            for i in (0, 1):
                bearer = fleet.tokens(i)["default"]
                assert bearer != saved, f"n{i} serves the replayed, expired bearer"
                assert jwt_claims(bearer)["exp"] > time.time(), f"n{i} serves an expired bearer"
            time.sleep(0.2)
        assert redis.command("HGET", RECORD, "blob") != replayed_blob, "the replay stayed newest"
        for i in (0, 1):
            states = {p["profile"]: p["state"] for p in fleet.status(i)}
            assert states["default"] != "login_required", fleet.logs()
        assert "fleet_record_refused" in fleet.logs()
        assert alive(fleet)
    finally:
        fleet.close()


@pytest.mark.parametrize(
    "garbage",
    ["x", "1e+20", "-1", "99999999999999999999", "9" * 5000],
    ids=["letter", "float", "negative", "20-digits", "5000-digits"],
)
def test_a_generation_that_does_not_parse_leaves_every_node_alive(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess, garbage: str
) -> None:
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=2)
    try:
        fleet.login_all()
        wait_until(lambda: serving(fleet, 1), 5, "n1 serves the login")
        redis.command("HSET", RECORD, "gen", garbage)
        for i in (0, 1):

            def unhealthy(i: int = i) -> bool:
                return bool(fleet.status(i)[0]["fleet"]["healthy"] is False)

            wait_until(
                unhealthy,
                5,
                f"n{i} marks the store unhealthy",
            )
        time.sleep(1.0)
        assert alive(fleet), fleet.logs()
        for i in (0, 1):
            assert fleet.tokens(i)["default"]
            assert "generation" in str(fleet.status(i)[0]["fleet"]["last_error"])
        # A restart does not crash on its first poll either.
        fleet.kill(1)
        fleet.start(1)
        time.sleep(1.0)
        assert alive(fleet), fleet.logs()
    finally:
        fleet.close()


def test_a_lease_without_expiry_is_a_few_commands_a_second(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=1, poll_interval=1.0)
    try:
        fleet.login_all()
        redis.command("SET", LEASE, "evil x")
        redis.command("CONFIG", "RESETSTAT")
        window = 8.0
        time.sleep(window)  # a rotation falls due within the window (at half of 6 s)
        stats = redis.command("INFO", "commandstats")
        calls = sum(
            int(part.split("=")[1])
            for line in stats.splitlines()
            if line.startswith("cmdstat_")
            for part in line.split(":")[1].split(",")
            if part.startswith("calls=")
        )
        # The steady cost of one node, the commands inside its scripts counted: a
        # heartbeat (4) and a poll (4) a second. The lease adds one try per lease_ttl.
        print(f"{calls} Redis commands in {window} s under an unexpiring lease")
        assert calls / window < 20, f"{calls} Redis commands in {window} s"
        fleet_table = fleet.status(0)[0]["fleet"]
        assert fleet_table["lease"] == "held_without_expiry"
        assert fleet_table["lease_holder"] == "evil"
        assert alive(fleet)
    finally:
        fleet.close()


def _output_bytes(redis: RedisServer) -> int:
    info = redis.command("INFO", "stats")
    (line,) = [x for x in info.splitlines() if x.startswith("total_net_output_bytes:")]
    return int(line.split(":")[1])


@pytest.mark.parametrize("where", ["record", "generation", "lease", "nodes"])
def test_huge_values_in_the_store_are_not_read_into_the_nodes(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess, where: str
) -> None:
    """20 MB in a record's blob (under a higher generation) or its generation, in a
    lease's value, or 50,000 fresh entries in the nodes hash: no node reads it all at
    every poll (each would hold it in memory, and a read longer than command_timeout
    fails forever). A record or generation that large is the store's failure; a lease's
    holder is cut to a node name's length; the nodes listed are those a node could
    have written lately, a few hundred at most. Every node stays up and serving."""
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=2)
    huge = "9" * 20_000_000
    try:
        fleet.login_all()
        wait_until(lambda: serving(fleet, 1), 5, "n1 serves the login")
        generation = int(redis.command("HGET", RECORD, "gen"))
        if where == "record":
            redis.command("HSET", RECORD, "blob", huge, "gen", str(generation + 1))
        elif where == "generation":
            redis.command("HSET", RECORD, "gen", huge)
        elif where == "lease":
            redis.command("SET", LEASE, "evil" + huge, "PX", "60000")
        redis.command("CONFIG", "RESETSTAT")
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            if where == "nodes":  # kept fresh, as an attacker would
                now = redis.command("TIME")[0]
                flood = [x for i in range(50_000) for x in (f"ghost{i}", now)]
                redis.command("HSET", "geins-broker:nodes", *flood)
            time.sleep(0.5)
        sent = _output_bytes(redis)
        assert sent < 2_000_000, f"Redis sent {sent} bytes in 3 s"
        assert alive(fleet), fleet.logs()
        for i in (0, 1):
            assert fleet.tokens(i)["default"]
            table = fleet.status(i)[0]["fleet"]
            if where in ("record", "generation"):
                assert table["healthy"] is False
                assert "oversized" in str(table["last_error"]), table
            elif where == "lease":
                assert len(table["lease_holder"]) <= 256
            else:
                assert len(table["nodes"]) <= 256
    finally:
        fleet.close()


def test_a_flood_of_forged_announcements_is_a_few_log_lines(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    """20,000 announcements of a higher generation whose record does not open, published
    in one burst: the node serves on, and logs them in a line or two, not a line each."""
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=1)
    try:
        fleet.login_all()
        forged = b"default 99 1 1 evil 1\n" + b"x" * 64
        with socket.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
            sock.sendall(
                b"".join(
                    resp_command("PUBLISH", "geins-broker:generations", forged.decode())
                    for _ in range(20_000)
                )
            )
            stream = sock.makefile("rb")
            for _ in range(20_000):
                assert stream.readline().startswith(b":")
        time.sleep(0.5)
        log = fleet.logs()
        assert 1 <= log.count("fleet_record_unreadable") <= 2, log.count("fleet_record_unreadable")
        assert fleet.tokens(0)["default"]
        assert alive(fleet)
    finally:
        fleet.close()
