"""Fleet mode over real processes: three daemons, one redis-server, one emulator.

Rotations are compressed to seconds (tokens of a few seconds, rotated at half their
life). The emulator writes each session's rotation count into its bearer's jti, so
"exactly one refresh per rotation" is checked from the tokens the nodes serve and the
emulator's own request counts: every refresh request it answered advanced a session
(none wasted, none rejected), and no session rotated more often than its period allows.
"""

from __future__ import annotations

import base64
import json
import math
import random
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.core.sealing import Key, Keyring
from geins_broker_client.errors import BrokerError, Unavailable
from tests.fleet.support import (
    CLEAR_JWT,
    CuttableProxy,
    Fleet,
    RedisServer,
    fleet_env,
    fleet_fixtures,
    jti_rotations,
    make_tls,
    refresh_requests,
)
from tests.support import DEMO_USER, GEINS_BROKER, EmulatorProcess, wait_until

TOKEN_TTL = 6.0
LEASE_TTL = 2.0
REFRESH_AT = 0.5
#: The shortest rotation period the jitter allows: 0.45 of the lifetime.
MIN_PERIOD = TOKEN_TTL * (REFRESH_AT - 0.05)


redis, emulator = fleet_fixtures(TOKEN_TTL)


def same_tokens_everywhere(fleet: Fleet, nodes: list[int]) -> dict[str, str]:
    first = fleet.tokens(nodes[0])
    for i in nodes[1:]:
        assert fleet.tokens(i) == first, f"node n{i} serves other tokens than n{nodes[0]}"
    return first


def refresh_tokens_on_disk(fleet: Fleet) -> set[str]:
    """Every refresh token in the nodes' own (sealed) session files, opened with the
    fleet's key: what must not appear in Redis in clear."""
    keyring = Keyring(Key(base64.b64decode(fleet.key_file.read_text())))
    found = set()
    for path in fleet.workdir.glob("n*/state/*.session.json"):
        profile = path.name.removesuffix(".session.json")
        data = json.loads(keyring.open(profile, path.read_bytes()).data)
        if data.get("refresh_token"):
            found.add(data["refresh_token"])
    assert found, "no session files to take refresh tokens from"
    return found


def assert_nothing_in_clear(redis: RedisServer, secrets_: set[str]) -> None:
    values = redis.scan_values()
    assert values, "the fleet wrote nothing to Redis"
    for key, value in values.items():
        assert not CLEAR_JWT.search(value), f"a JWT in clear under {key}"
        for secret in secrets_:
            assert secret.encode() not in value, f"a refresh token in clear under {key}"


@pytest.mark.parametrize(
    "count", [20, pytest.param(100, marks=pytest.mark.slow)], ids=["20", "100"]
)
def test_one_refresh_per_rotation_across_three_nodes(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess, count: int
) -> None:
    profiles = tuple(f"p{i}" for i in range(count))
    fleet = Fleet(short_tmp, emulator, redis.url, profiles=profiles, refresh_at=REFRESH_AT)
    try:
        fleet.login_all(0)
        # A login on n0 is served by every node.
        wait_until(
            lambda: all(s["state"] == "active" for i in (1, 2) for s in fleet.status(i)),
            10,
            "n1 and n2 adopt the logins made on n0",
        )
        start_tokens = same_tokens_everywhere(fleet, [0, 1, 2])
        start = {p: jti_rotations(t) for p, t in start_tokens.items()}
        began = time.monotonic()
        before = geins_counts(emulator)
        time.sleep(3 * TOKEN_TTL * REFRESH_AT + 1)
        tokens = wait_until(lambda: _settled(fleet), 5, "every node serves the same tokens")
        elapsed = time.monotonic() - began
        after = geins_counts(emulator)
        rotations = {}
        for profile, token in tokens.items():
            family, count = jti_rotations(token)
            assert family == start[profile][0], f"{profile}: the session was replaced"
            rotations[profile] = count - start[profile][1]
        assert min(rotations.values()) >= 2, rotations
        assert max(rotations.values()) <= math.ceil(elapsed / MIN_PERIOD) + 1, rotations
        # Every refresh request the emulator answered advanced a session by one: none
        # was made twice for one rotation, none was refused as a reused token. Both
        # counts come from one answer of the emulator's, so a refresh still under way
        # when the nodes were read counts on both sides; what the nodes serve is at most
        # that many rotations along.
        requests = after["refresh_requests"] - before["refresh_requests"]
        rotated = after["all_rotations"] - before["all_rotations"]
        assert requests == rotated
        assert sum(rotations.values()) <= rotated
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


def geins_counts(emulator: EmulatorProcess) -> dict[str, int]:
    """The emulator's refresh requests and rotations, read in one answer."""
    answer: dict[str, int] = emulator.control("POST", "user_sessions", {"username": DEMO_USER})
    return answer


def _settled(fleet: Fleet) -> dict[str, str] | None:
    """The tokens, once every node serves the same ones (None until then)."""
    try:
        tokens = [fleet.tokens(i) for i in sorted(fleet.daemons)]
    except BrokerError:
        return None
    return tokens[0] if all(t == tokens[0] for t in tokens) else None


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


def lease_holders(redis: RedisServer, skip: frozenset[str] = frozenset()) -> list[int]:
    """The nodes holding a refresh lease right now (leases in `skip` left out)."""
    return [int(v.split(" ")[0].removeprefix("n")) for v in leases(redis) - skip]


def leases(redis: RedisServer) -> set[str]:
    values = (redis.command("GET", key) for key in redis.command("KEYS", "geins-broker:*:lease"))
    return {v for v in values if v}


def assert_serving_unexpired(fleet: Fleet) -> None:
    """No node hands out an expired token (an answer may also be an error)."""
    for i in list(fleet.daemons):
        with fleet.client(i) as client:
            for profile in fleet.profiles:
                token = client.token(profile)
                assert token.expires_at > time.time(), f"n{i} served an expired token"


def kill_lease_holders(fleet: Fleet, redis: RedisServer, kills: int, deadline: float) -> int:
    """Kill -9 whichever node holds a lease (else a random one), restart it, let the
    fleet work for one lease TTL and a random moment more; repeat. Each kill may stall
    a rotation by up to one lease TTL; killing the next holder of the same profile
    before that stall is over would stack them past the bearer's lifetime, which no
    lease protocol survives: the pause is the adversary's fairness."""
    done = 0
    rng = random.Random(14)
    dead_leases: frozenset[str] = frozenset()
    while done < kills and time.monotonic() < deadline:
        holders: list[int] = []
        wait_end = time.monotonic() + TOKEN_TTL
        while not holders and time.monotonic() < wait_end:
            holders = [h for h in lease_holders(redis, dead_leases) if h in fleet.daemons]
            time.sleep(0.01)
        victim = holders[0] if holders else rng.choice(list(fleet.daemons))
        fleet.kill(victim)
        dead_leases = frozenset(v for v in leases(redis) if v.startswith(f"n{victim} "))
        assert_serving_unexpired(fleet)
        fleet.start(victim)
        done += 1
        time.sleep(LEASE_TTL + rng.uniform(0, LEASE_TTL / 4))
    return done


def run_kill_loop(short_tmp: Path, redis: RedisServer, kills: int, budget: float) -> None:
    # (Faults go in after the logins, so "/login" hits refreshes only.)
    # The refresh's answer is late (0.3 s after Geins rotated), so a kill often lands
    # in the window where only the dying node knows the new refresh token; the
    # emulator's reuse grace (longer than the lease) lets the next holder replay the
    # old one, so no session may be lost.
    with fleet_env(short_tmp, token_ttl=TOKEN_TTL, refresh_grace=10.0) as emulator:
        emulator.control(
            "POST",
            "faults",
            {"kind": "latency", "match": "/login", "seconds": 0.3, "after": True},
        )
        profiles = tuple(f"p{i}" for i in range(5))
        fleet = Fleet(short_tmp, emulator, redis.url, profiles=profiles, refresh_at=REFRESH_AT)
        try:
            fleet.login_all(0)
            wait_until(
                lambda: all(s["state"] == "active" for i in (1, 2) for s in fleet.status(i)),
                5,
                "every node adopts the logins",
            )
            done = kill_lease_holders(fleet, redis, kills, time.monotonic() + budget)
            assert done == kills
            wait_until(lambda: _settled(fleet), 10, "the fleet settles on one session")
            for i in (0, 1, 2):
                states = {s["profile"]: s["state"] for s in fleet.status(i)}
                assert set(states.values()) == {"active"}, (i, states)
            assert_serving_unexpired(fleet)
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            fleet.close()


def test_kill_9_of_lease_holders_loses_nothing_under_the_reuse_grace(
    short_tmp: Path, redis: RedisServer
) -> None:
    run_kill_loop(short_tmp, redis, kills=6, budget=60)


@pytest.mark.slow
def test_30_kills_of_lease_holders(short_tmp: Path, redis: RedisServer) -> None:
    run_kill_loop(short_tmp, redis, kills=30, budget=300)


@pytest.mark.soak
def test_200_kills_of_lease_holders(short_tmp: Path, redis: RedisServer) -> None:
    run_kill_loop(short_tmp, redis, kills=200, budget=1500)


def test_a_kill_after_geins_rotated_is_a_loss_reported_on_every_node(
    short_tmp: Path, redis: RedisServer
) -> None:
    # Strict rotation (no grace): the holder dies after Geins rotated and before the
    # commit; the next holder's refresh is refused. Exactly the single-host crash
    # window, and the loss is reported fleet-wide, not hidden.
    with fleet_env(short_tmp, token_ttl=TOKEN_TTL) as emulator:
        fleet = Fleet(short_tmp, emulator, redis.url, refresh_at=REFRESH_AT)
        try:
            fleet.login_all(0)
            wait_until(lambda: fleet.status(2)[0]["state"] == "active", 5, "n2 adopts")
            emulator.control(
                "POST",
                "faults",
                {
                    "kind": "latency",
                    "match": "/login",
                    "seconds": 3.0,
                    "after": True,
                    "times": 1,
                },
            )
            holders = wait_until(lambda: lease_holders(redis), TOKEN_TTL, "a node takes the lease")
            time.sleep(0.5)  # Geins has rotated; the answer is still on its way
            fleet.kill(holders[0])
            survivors = list(fleet.daemons)
            wait_until(
                lambda: all(fleet.status(i)[0]["state"] == "login_required" for i in survivors),
                TOKEN_TTL + 5,
                "every surviving node reports the lost session",
            )
            for i in survivors:
                assert fleet.status(i)[0]["last_error"]
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            fleet.close()


@pytest.mark.parametrize("persist", [False, True], ids=["empty", "persistent"])
def test_redis_restarted_mid_rotation(short_tmp: Path, persist: bool) -> None:
    redis = RedisServer(short_tmp, persist=persist)
    try:
        with fleet_env(short_tmp, token_ttl=TOKEN_TTL) as emulator:
            profiles = tuple(f"p{i}" for i in range(5))
            fleet = Fleet(short_tmp, emulator, redis.url, profiles=profiles, refresh_at=REFRESH_AT)
            try:
                fleet.login_all(0)
                wait_until(lambda: _settled(fleet), 5, "every node adopts the logins")
                base = refresh_requests(emulator)
                # Refreshes answer 0.3 s late: a rotation stays under way long enough
                # for the kill to land in the middle of one.
                emulator.control(
                    "POST",
                    "faults",
                    {"kind": "latency", "match": "/login", "seconds": 0.3, "after": True},
                )
                wait_until(
                    lambda: lease_holders(redis), TOKEN_TTL, "a rotation under way", every=0.01
                )
                redis.kill()
                time.sleep(1.0)
                redis.start()
                if not persist:
                    assert redis.command("KEYS", "*:record") == [] or True  # republished soon
                wait_until(
                    lambda: len(redis.command("KEYS", "geins-broker:*:record")) == len(profiles),
                    10,
                    "the nodes republish every session",
                )
                time.sleep(2 * TOKEN_TTL * REFRESH_AT)
                tokens = wait_until(lambda: _settled(fleet), 10, "one session per profile again")
                rotations = sum(jti_rotations(t)[1] for t in tokens.values())
                # Nothing was lost and nothing wasted: every refresh advanced a session.
                assert refresh_requests(emulator) - base <= rotations
                for i in (0, 1, 2):
                    assert {s["state"] for s in fleet.status(i)} == {"active"}
            except BaseException:
                print(fleet.logs())
                raise
            finally:
                fleet.close()
    finally:
        redis.stop()


def test_clock_skew_between_nodes_changes_nothing(short_tmp: Path, redis: RedisServer) -> None:
    offsets = {0: "0", 1: "45", 2: "-45"}
    with fleet_env(short_tmp, token_ttl=TOKEN_TTL) as emulator:
        fleet = Fleet(
            short_tmp,
            emulator,
            redis.url,
            refresh_at=REFRESH_AT,
            env=lambda i: {"GEINS_BROKER_CLOCK_OFFSET": offsets[i]},
        )
        try:
            fleet.login_all(0)
            wait_until(lambda: _settled(fleet), 5, "every node adopts the login")
            _, start = jti_rotations(fleet.tokens(0)["default"])
            base = refresh_requests(emulator)
            began = time.monotonic()
            time.sleep(3 * TOKEN_TTL * REFRESH_AT)
            tokens = wait_until(lambda: _settled(fleet), 5, "one session everywhere")
            elapsed = time.monotonic() - began
            rotations = jti_rotations(tokens["default"])[1] - start
            assert 2 <= rotations <= math.ceil(elapsed / MIN_PERIOD) + 1
            assert refresh_requests(emulator) - base == rotations
            # Each node states expiry on its own clock, the same lifetime left everywhere.
            for i in (0, 1, 2):
                status = fleet.status(i)[0]
                assert status["state"] == "active"
        except BaseException:
            print(fleet.logs())
            raise
        finally:
            fleet.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*GEINS_BROKER, *args], capture_output=True, text=True, timeout=30, check=False
    )


def test_status_and_cluster_show_the_fleet(
    short_tmp: Path, redis: RedisServer, emulator: EmulatorProcess
) -> None:
    fleet = Fleet(short_tmp, emulator, redis.url, nodes=2)
    try:
        fleet.login_all(0)
        wait_until(lambda: fleet.status(1)[0]["state"] == "active", 5, "n1 adopts the login")
        wait_until(
            lambda: fleet.status(1)[0]["fleet"]["nodes"] == ["n0", "n1"], 5, "n1 sees both nodes"
        )
        socket = str(fleet.socket(1))
        shown = cli("cluster", "--socket", socket, "--json")
        assert shown.returncode == 0, shown.stderr
        report = json.loads(shown.stdout)
        assert report["node"] == "n1"
        assert report["healthy"] is True
        assert report["nodes"] == ["n0", "n1"]
        assert report["profiles"] == [
            {
                "profile": "default",
                "state": "active",
                "generation": 1,
                "committed_by": "n0",
                "lease_holder": None,
                "lease": "free",
            }
        ]
        text = cli("status", "--socket", socket)
        assert "GENERATION" in text.stdout and "store redis://127.0.0.1" in text.stdout
        scraped = cli("metrics", "--socket", socket)
        assert scraped.returncode == 0, scraped.stderr
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(scraped.stdout)
            for s in family.samples
        }
        assert samples[("geins_broker_fleet_store_up", (("node", "n1"),))] == 1.0
        assert samples[("geins_broker_fleet_nodes", ())] == 2.0
        assert samples[("geins_broker_fleet_generation", (("profile", "default"),))] == 1.0
        assert samples[("geins_broker_fleet_leases_held", ())] == 0.0
        redis.kill()
        wait_until(lambda: fleet.status(1)[0]["fleet"]["healthy"] is False, 5, "n1 notices")
        down = cli("cluster", "--socket", socket)
        assert down.returncode == 7
        assert "UNREACHABLE" in down.stdout
        scraped = cli("metrics", "--socket", socket)
        assert 'geins_broker_fleet_store_up{node="n1"} 0.0' in scraped.stdout
    finally:
        fleet.close()


def test_demo_fleet_shows_one_refresh_per_rotation() -> None:
    shown = subprocess.run(
        [*GEINS_BROKER, "demo", "--fleet", "3", "--token-ttl", "6", "--duration", "12"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    rotations = [line for line in shown.stdout.splitlines() if "rotated by n" in line]
    assert len(rotations) >= 2, shown.stdout
    last = rotations[-1].split("refreshes at Geins ")[1]
    refreshes, _, rest = last.partition(" for ")
    assert refreshes == rest.split(" ")[0], rotations[-1]
    assert "stopped" in shown.stdout


def test_the_redis_password_comes_from_a_file_and_is_never_shown(
    short_tmp: Path, emulator: EmulatorProcess
) -> None:
    password = "s3cret-redis-" + "pw" * 8
    redis = RedisServer(short_tmp, password=password)
    secret = short_tmp / "redis-password"
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    fleet: Fleet | None = None
    try:
        fleet = Fleet(
            short_tmp, emulator, redis.url, nodes=2, cluster={"password_file": str(secret)}
        )
        fleet.login_all(0)
        wait_until(lambda: fleet.status(1)[0]["state"] == "active", 5, "n1 adopts the login")
        assert fleet.status(1)[0]["fleet"]["healthy"] is True
        # A wrong password: the store is unreachable, and says so without the password.
        redis.command("CONFIG", "SET", "requirepass", password + "-rotated")
        redis.password = password + "-rotated"
        redis.command("CLIENT", "KILL", "TYPE", "normal")
        redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        wait_until(lambda: fleet.status(1)[0]["fleet"]["healthy"] is False, 10, "n1 notices")
        shown = json.dumps([fleet.status(i) for i in (0, 1)])
        shown += cli("cluster", "--socket", str(fleet.socket(1)), "--json").stdout
        shown += fleet.logs()
        assert password not in shown
        assert "unreachable" in fleet.logs()
    finally:
        if fleet is not None:
            fleet.close()
        redis.stop()


def test_rediss_with_a_private_ca(short_tmp: Path, emulator: EmulatorProcess) -> None:
    tls = make_tls(short_tmp)
    redis = RedisServer(short_tmp, tls=tls)
    fleet: Fleet | None = None
    try:
        fleet = Fleet(short_tmp, emulator, redis.url, nodes=2, cluster={"ca_file": str(tls[0])})
        fleet.login_all(0)
        wait_until(lambda: fleet.status(1)[0]["state"] == "active", 5, "n1 adopts the login")
        assert fleet.status(1)[0]["fleet"]["store"].startswith("rediss://127.0.0.1:")
        assert fleet.tokens(0) == fleet.tokens(1)
    finally:
        if fleet is not None:
            fleet.close()
        redis.stop()
