"""Metrics against the daemon: values move as sessions log in, rotate, fail and die.

The daemon runs in-process against the in-process emulator under MockClock (times are
virtual and exact); each scrape goes through the `metrics` op, the exposition is parsed
with prometheus_client's parser. The real `geins-broker metrics` command against real
processes is in test_observability_cli.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.core.errors import Forbidden
from broker.emulator.app import Emulator
from broker.emulator.model.faults import Fault
from broker.emulator.model.service import DEMO_USER
from broker.observe.metrics import Snapshot, render
from broker.observe.textfile import TextfileAccess, write_textfile
from broker.rpc.ops import Api
from broker.rpc.peercred import Peer
from geins_broker_client import LoginRequired
from geins_broker_client.protocol import encode
from tests.support import Broker, RawConnection, Scrape, exact_broker


async def scrape(broker: Broker) -> Scrape:
    async with broker.client() as client:
        return Scrape(await client.metrics())


async def test_values_follow_login_rotations_failures_and_a_dead_session(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await exact_broker(nursery, emulator, wall, short_tmp)
    m = await scrape(broker)
    assert m("geins_broker_info", version=m.labels("geins_broker_info")[0]["version"]) == 1
    assert m("geins_broker_start_time_seconds") == broker.daemon.telemetry.started_at
    assert m("geins_broker_session_state", profile="default", state="logged_out") == 1
    assert m.get("geins_broker_session_expiry_timestamp_seconds", profile="default") is None

    await broker.login()
    session = broker.profile().session
    tokens = session.tokens
    assert tokens is not None
    m = await scrape(broker)
    assert m("geins_broker_session_state", profile="default", state="active") == 1
    assert m("geins_broker_session_state", profile="default", state="logged_out") == 0
    assert m("geins_broker_session_expiry_timestamp_seconds", profile="default") == (
        tokens.expires_at
    )
    assert m("geins_broker_session_next_refresh_timestamp_seconds", profile="default") == (
        session.next_refresh_at
    )
    assert m("geins_broker_session_end_timestamp_seconds", profile="default") == (
        tokens.session_expires_at
    )
    for route in ("challenge", "signature", "login"):
        assert m("geins_broker_upstream_requests_total", route=route, status_class="2xx") == 1

    async with broker.client() as client:
        for _ in range(3):
            await client.token()
        await trio.sleep(200)
        await client.token(min_valid=800)  # 700 s left: refreshed first
    m = await scrape(broker)
    assert m("geins_broker_token_requests_total", profile="default", result="memory") == 3
    assert m("geins_broker_token_requests_total", profile="default", result="waited") == 1
    assert m("geins_broker_refresh_total", profile="default", result="ok") == 1
    assert m("geins_broker_refresh_duration_seconds_count") == 1
    assert m("geins_broker_refresh_duration_seconds_bucket", le="+Inf") == 1

    # Geins fails: the rotation at 875 s and its retry a second later.
    emulator.server.faults.add(Fault("status", match="GET /api", status=503))
    await trio.sleep(675 + 1.5)
    m = await scrape(broker)
    assert m("geins_broker_refresh_total", profile="default", result="upstream_unavailable") == 2
    assert m("geins_broker_upstream_requests_total", route="refresh", status_class="5xx") == 2
    assert m("geins_broker_session_state", profile="default", state="degraded") == 1
    assert m("geins_broker_session_state", profile="default", state="active") == 0

    emulator.server.clear_faults()
    await trio.sleep(2)  # the third try, two seconds later, works
    m = await scrape(broker)
    assert m("geins_broker_refresh_total", profile="default", result="ok") == 2
    assert m("geins_broker_session_state", profile="default", state="active") == 1
    assert m("geins_broker_refresh_duration_seconds_count") == 4
    refresh_requests = m(
        "geins_broker_upstream_requests_total", route="refresh", status_class="2xx"
    )
    assert refresh_requests == 2
    assert m("geins_broker_upstream_request_duration_seconds_count", route="refresh") == 4

    # The refresh token dies: login required, no refresh planned; then the bearer runs out.
    emulator.service.revoke_user(DEMO_USER)
    await trio.sleep(675)
    m = await scrape(broker)
    assert m("geins_broker_refresh_total", profile="default", result="rejected") == 1
    assert m("geins_broker_session_state", profile="default", state="login_required") == 1
    assert m.get("geins_broker_session_next_refresh_timestamp_seconds", profile="default") is None
    await trio.sleep(300)
    async with broker.client() as client:
        with pytest.raises(LoginRequired):
            await client.token()
    m = await scrape(broker)
    assert m("geins_broker_token_requests_total", profile="default", result="login_required") == 1
    assert m("geins_broker_errors_total", code="login_required") == 1
    assert m("geins_broker_token_requests_total", profile="default", result="memory") == 3


async def test_connections_waiting_ops_and_errors(
    autojump_clock: MockClock, broker: Broker, emulator: Emulator
) -> None:
    await broker.login()
    emulator.server.faults.add(Fault("stall", match="GET /api"))
    watcher = await RawConnection.open(broker.socket)
    stuck = await RawConnection.open(broker.socket)
    try:
        await watcher.request(id=1, op="watch")
        assert (await watcher.receive() or {}).get("event") == "token"
        await stuck.request(id=1, op="refresh")  # stalls at Geins
        await trio.sleep(1)
        m = await scrape(broker)
        assert m("geins_broker_connections") == 3  # the two, and the scrape's own
        assert m("geins_broker_waiting_ops", op="watch") == 1
        assert m("geins_broker_waiting_ops", op="refresh") == 1
        assert m("geins_broker_ops_waited_total", op="refresh") == 1
        assert m("geins_broker_ops_waited_total", op="login") == 1
        assert m("geins_broker_refreshes_in_flight") == 1
        await stuck.send(encode({"op": "token"}))  # no id: bad_request
        await stuck.send(b"\x00\x00\x00\x01\xc1")  # not msgpack: bad_frame, then closed
        assert await stuck.receive() is not None
    finally:
        watcher.close()
        stuck.close()
        emulator.server.clear_faults()
    await trio.sleep(1)
    m = await scrape(broker)
    assert m("geins_broker_errors_total", code="bad_request") == 1
    assert m("geins_broker_errors_total", code="bad_frame") == 1
    assert m("geins_broker_waiting_ops", op="watch") == 0
    assert m("geins_broker_connections_accepted_total") == 5  # login, the two, two scrapes


async def test_client_chosen_names_never_become_labels(
    autojump_clock: MockClock, broker: Broker
) -> None:
    """A hostile peer asking for a thousand made-up profiles adds no series."""
    await broker.login()
    before = set((await scrape(broker)).samples)
    conn = await RawConnection.open(broker.socket)
    try:
        for i in range(1000):
            answer = await conn.call(id=i, op="token", profile=f"nope-{i}")
            assert answer["error"]["code"] == "unknown_profile"
    finally:
        conn.close()
    m = await scrape(broker)
    assert m("geins_broker_errors_total", code="unknown_profile") == 1000
    assert "nope-" not in m.text
    assert set(m.samples) - before == {
        ("geins_broker_errors_total", frozenset({("code", "unknown_profile")})),
        ("geins_broker_waiting_ops", frozenset({("op", "token")})),  # the long way
        ("geins_broker_ops_waited_total", frozenset({("op", "token")})),
    }


async def test_no_secret_in_the_exposition(autojump_clock: MockClock, broker: Broker) -> None:
    await broker.login()
    tokens = broker.profile().session.tokens
    assert tokens is not None and tokens.refresh is not None
    text = (await scrape(broker)).text
    # The synchronous form, for a caller that renders on its own thread, says the same
    # (but for the scrape's own connection and op, gone by now).
    sync = Scrape(broker.daemon.telemetry.metrics.render_metrics().decode())
    assert sync.families.keys() == Scrape(text).families.keys()
    assert sync("geins_broker_session_state", profile="default", state="active") == 1
    assert tokens.bearer.reveal() not in text
    assert tokens.refresh.reveal() not in text
    assert tokens.bearer.reveal().split(".")[1] not in text


async def test_per_profile_off_sums_over_profiles(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await exact_broker(
        nursery,
        emulator,
        wall,
        short_tmp,
        profiles=("a", "b", "c"),
        metrics={"per_profile": False},
    )
    await broker.login("a")
    await trio.sleep(100)
    await broker.login("b")
    async with broker.client() as client:
        await client.token("a")
        await client.token("b")
        await client.token("b")
    m = await scrape(broker)
    assert all(label != "profile" for _, labels in m.samples for label, _ in labels)
    assert m("geins_broker_sessions", state="active") == 2
    assert m("geins_broker_sessions", state="logged_out") == 1
    assert m("geins_broker_token_requests_total", result="memory") == 3
    first = broker.profile("a").session.tokens
    assert first is not None
    assert m("geins_broker_session_expiry_earliest_timestamp_seconds") == first.expires_at
    assert "geins_broker_session_state" not in m.families
    await trio.sleep(575.5)  # a rotates
    m = await scrape(broker)
    assert m("geins_broker_refresh_total", result="ok") == 1


async def test_a_removed_profile_keeps_the_sums_from_going_down(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await exact_broker(
        nursery, emulator, wall, short_tmp, profiles=("a", "b"), metrics={"per_profile": False}
    )
    await broker.login("b")
    async with broker.client() as client:
        await client.token("b")
    daemon = broker.daemon
    removed = daemon.profiles.pop("b")
    daemon.roster.retired["b"] = removed  # what a reload that drops b does
    removed.retire()
    m = await scrape(broker)
    assert m("geins_broker_token_requests_total", result="memory") == 1
    assert m("geins_broker_sessions", state="active") == 0


def test_metrics_op_is_for_admins_only() -> None:
    async def render() -> tuple[str, str]:
        return "x 1\n", "text/plain"

    async def main() -> None:
        api = Api({}, admin_uid=1000, metrics=render)
        with pytest.raises(Forbidden):
            await api.metrics(Peer(pid=1, uid=4242, gid=4242), {})
        answer = await api.metrics(Peer(pid=1, uid=1000, gid=1000), {})
        assert answer == {"text": "x 1\n", "content_type": "text/plain"}
        api.metrics_readers = (frozenset({4242}), frozenset({77}))  # [metrics] allow_*
        await api.metrics(Peer(pid=1, uid=4242, gid=4242), {})
        await api.metrics(Peer(pid=1, uid=5, gid=5, groups=frozenset({77})), {})
        with pytest.raises(Forbidden):
            await api.metrics(Peer(pid=1, uid=5, gid=5), {})

    trio.run(main)


# -- the textfile --------------------------------------------------------------------------


async def test_textfile_is_written_at_start_and_every_interval(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    path = short_tmp / "textfile" / "geins_broker.prom"
    path.parent.mkdir()
    broker = await exact_broker(
        nursery,
        emulator,
        wall,
        short_tmp,
        metrics={"textfile": str(path), "textfile_interval": 10},
    )
    await trio.testing.wait_all_tasks_blocked()
    assert trio.current_time() == 0  # written at once, not after the first interval
    first = Scrape(path.read_text())
    assert first("geins_broker_session_state", profile="default", state="logged_out") == 1
    assert os.stat(path).st_mode & 0o777 == 0o640  # node_exporter reads it by its group
    await broker.login()
    async with broker.client() as client:
        await client.token()
    await trio.sleep(9)
    assert (
        Scrape(path.read_text())("geins_broker_session_state", profile="default", state="active")
        == 0
    )
    await trio.sleep(1.5)
    latest = Scrape(path.read_text())
    assert latest("geins_broker_session_state", profile="default", state="active") == 1
    assert latest("geins_broker_token_requests_total", profile="default", result="memory") == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["geins_broker.prom"]


async def test_a_textfile_that_cannot_be_written_is_counted_and_retried(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    path = short_tmp / "missing" / "geins_broker.prom"
    broker = await exact_broker(
        nursery, emulator, wall, short_tmp, metrics={"textfile": str(path), "textfile_interval": 5}
    )
    await trio.sleep(5.5)
    m = await scrape(broker)
    assert m("geins_broker_textfile_write_failures_total") == 2
    await broker.login()  # the daemon carries on
    path.parent.mkdir()
    await trio.sleep(5)
    assert Scrape(path.read_text())("geins_broker_textfile_write_failures_total") == 2


def test_textfile_replacement_is_atomic(tmp_path: Path) -> None:
    """A reader at any moment sees one whole version, never a part of one."""
    path = tmp_path / "m.prom"
    versions = [b"a 1\n" * 200_000, b"b 2\n" * 150_000]
    write_textfile(path, versions[0])
    stop = threading.Event()
    seen: set[int] = set()
    torn: list[int] = []

    def read() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            if data in versions:
                seen.add(versions.index(data))
            else:
                torn.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            write_textfile(path, versions[i % 2])
    finally:
        stop.set()
        reader.join()
    assert torn == []
    assert seen == {0, 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.prom"]


def test_textfile_replaces_a_planted_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "m.prom"
    path.symlink_to(victim)
    write_textfile(path, b"x 1\n")
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink()
    assert path.read_bytes() == b"x 1\n"


@pytest.mark.parametrize(("public", "mode"), [(False, 0o640), (True, 0o644)])
def test_textfile_has_its_group_and_is_public_only_when_said(
    tmp_path: Path, public: bool, mode: int
) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file another group needs root (CI runs as root)")
    path = tmp_path / "m.prom"
    write_textfile(path, b"x 1\n", TextfileAccess(gid=65534, public=public))
    info = path.stat()
    assert (info.st_gid, info.st_mode & 0o777) == (65534, mode)


async def test_health_for_healthz_follows_the_sessions(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await exact_broker(nursery, emulator, wall, short_tmp)
    health = broker.daemon.telemetry.health()
    assert (health.http_status, health.line()) == (503, "not logged in: default (logged out)")
    await broker.login()
    health = broker.daemon.telemetry.health()
    assert (health.http_status, health.line()) == (200, "healthy: 1 profile active")
    emulator.server.faults.add(Fault("status", match="GET /api", status=503))
    await trio.sleep(675.5)
    health = broker.daemon.telemetry.health()
    assert (health.http_status, health.code) == (200, 1)
    assert health.line() == "degraded: default (Geins failed the refresh (503))"
    emulator.server.clear_faults()
    emulator.service.revoke_user(DEMO_USER)
    await trio.sleep(60)
    health = broker.daemon.telemetry.health()
    assert (health.http_status, health.code) == (503, 5)
    assert health.line().startswith("login required: default (Geins rejected the refresh token")


async def test_connections_over_the_limit_are_counted_as_refused(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await exact_broker(nursery, emulator, wall, short_tmp, max_connections=2)
    first = await RawConnection.open(broker.socket)
    second = await RawConnection.open(broker.socket)
    third = await RawConnection.open(broker.socket)
    answer = await third.receive()
    assert answer is not None and answer["error"]["code"] == "busy"
    third.close()
    first.close()
    await trio.sleep(0.1)
    m = await scrape(broker)
    second.close()
    assert m("geins_broker_connections_refused_total", reason="max_connections") == 1
    assert m("geins_broker_errors_total", code="busy") == 1
    assert m("geins_broker_connections") == 2  # the second, and the scrape


async def test_concurrent_scrapes_share_one_render(
    autojump_clock: MockClock, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import broker.daemon.telemetry as daemon_module

    renders: list[int] = []
    real = render

    def counted(snapshot: Snapshot) -> bytes:
        renders.append(1)
        return real(snapshot)

    monkeypatch.setattr(daemon_module, "render", counted)
    answers: list[bytes] = []

    async def one() -> None:
        answers.append(await broker.daemon.telemetry.render_metrics())

    async with trio.open_nursery() as scrapes:
        for _ in range(5):
            scrapes.start_soon(one)
    assert len(renders) == 1
    assert len(answers) == 5 and len(set(answers)) == 1
    await broker.daemon.telemetry.render_metrics()
    assert len(renders) == 2  # nothing cached: the next scrape renders afresh


async def test_other_components_register_their_own_families(
    autojump_clock: MockClock, broker: Broker
) -> None:
    """The seam the proxy and fleet mode will use: plain numbers they keep themselves."""
    from prometheus_client.metrics_core import GaugeMetricFamily

    metrics = broker.daemon.telemetry.metrics
    requests = metrics.counter("proxy_requests", "Proxied requests.", "status_class")
    latency = metrics.histogram("proxy_request_duration_seconds", "Proxy latency.", "route")
    metrics.add_source(lambda: [GaugeMetricFamily("geins_broker_fleet_generation", "G.", value=7)])
    requests.inc("2xx")
    requests.inc("2xx")
    requests.inc("5xx")
    latency.observe(0.02, "graphql")
    m = await scrape(broker)
    assert m("geins_broker_proxy_requests_total", status_class="2xx") == 2
    assert m("geins_broker_proxy_requests_total", status_class="5xx") == 1
    assert m("geins_broker_proxy_request_duration_seconds_bucket", route="graphql", le="0.025") == 1
    assert m("geins_broker_proxy_request_duration_seconds_bucket", route="graphql", le="0.01") == 0
    assert m("geins_broker_fleet_generation") == 7


# -- GET /metrics and GET /healthz, as the HTTP listener will ask -------------------------


async def test_http_routes_for_metrics_and_health(
    autojump_clock: MockClock, broker: Broker
) -> None:
    from broker.observe.routes import answer

    daemon = broker.daemon.telemetry  # what the routes read
    assert await answer(daemon, "GET", "/graphql") is None  # the proxy's, not ours
    status, headers, body = await answer(daemon, "GET", "/healthz") or (0, [], b"")
    assert (status, body) == (503, b"not logged in: default (logged out)\n")
    assert dict(headers)["Content-Type"] == "text/plain; charset=utf-8"
    await broker.login()
    status, _, body = await answer(daemon, "GET", "/healthz?verbose=1") or (0, [], b"")
    assert (status, body) == (200, b"healthy: 1 profile active\n")
    status, headers, body = await answer(daemon, "GET", "/metrics") or (0, [], b"")
    assert status == 200
    assert dict(headers)["Content-Type"].startswith("text/plain; version=0.0.4")
    assert dict(headers)["Cache-Control"] == "no-store"
    assert (
        Scrape(body.decode())("geins_broker_session_state", profile="default", state="active") == 1
    )
    status, headers, body = await answer(daemon, "HEAD", "/metrics") or (0, [], b"")
    assert (status, body) == (200, b"")
    assert dict(headers)["Content-Type"].startswith("text/plain; version=0.0.4")
    status, headers, _ = await answer(daemon, "POST", "/metrics") or (0, [], b"")
    assert (status, dict(headers)["Allow"]) == (405, "GET, HEAD")


async def test_metrics_and_healthz_on_the_proxy_listener(
    autojump_clock: MockClock, broker: Broker
) -> None:
    """The routes as Prometheus and a load balancer reach them: HTTP on the proxy's
    socket, beside proxied requests, which the metrics count."""
    import httpx

    transport = httpx.AsyncHTTPTransport(uds=str(broker.socket.parent / "merchant.sock"))
    async with httpx.AsyncClient(transport=transport, base_url="http://geins") as http:
        health = await http.get("/healthz")
        assert (health.status_code, health.text) == (503, "not logged in: default (logged out)\n")
        await broker.login()
        health = await http.get("/healthz")
        assert (health.status_code, health.text) == (200, "healthy: 1 profile active\n")
        proxied = await http.post("/graphql", json={"query": "{ getUser { email } }"})
        assert proxied.status_code == 200
        scraped = await http.get("/metrics")
        assert scraped.status_code == 200
        assert scraped.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        m = Scrape(scraped.text)
        assert m("geins_broker_session_state", profile="default", state="active") == 1
        assert m("geins_broker_proxy_requests_total", status_class="2xx") == 1  # not /healthz
        assert m("geins_broker_proxy_request_duration_seconds_count", status_class="2xx") == 1
        assert (await http.head("/metrics")).status_code == 200
        assert (await http.post("/metrics")).status_code == 405

        # Who may read them: root and the daemon's user (here both uid 0), and
        # [metrics] allow_users. Make this process a stranger, then allow it.
        api = broker.daemon.server.api  # type: ignore[union-attr]
        api.admin_uids = frozenset({4242})
        refused = await http.get("/metrics")
        assert refused.status_code == 403
        assert "geins_broker" not in refused.text
        assert (await http.get("/healthz")).status_code == 403
        api.metrics_readers = (frozenset({os.geteuid()}), frozenset())
        assert (await http.get("/metrics")).status_code == 200
