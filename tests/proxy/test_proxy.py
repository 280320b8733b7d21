"""The Merchant API proxy in-process, against the emulator, over real sockets.

Time is MockClock's (autojump) and wall time the TrioWallClock, so expiry, timeouts
and slow peers take no real time. The daemon runs as root here, so the caller is the
daemon's own uid and may read every profile; other uids are in test_proxy_processes.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from broker.core.clock import TrioWallClock
from broker.emulator.app import Emulator
from broker.emulator.model.service import DEMO_USER
from tests.support import Broker, broker_config, start_broker

GET_USER = {"query": "{ getUser { email } }"}


def proxy_client(broker: Broker, **kwargs: Any) -> httpx.AsyncClient:
    path = broker.socket.parent / "merchant.sock"
    transport = httpx.AsyncHTTPTransport(uds=str(path), **kwargs)
    return httpx.AsyncClient(transport=transport, base_url="http://geins", timeout=120)


@pytest.fixture
async def proxied(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> Broker:
    return await start_broker(nursery, emulator, wall, short_tmp, profiles=("default", "other"))


@pytest.fixture
async def client(proxied: Broker) -> AsyncIterator[httpx.AsyncClient]:
    async with proxy_client(proxied) as http:
        yield http


def graphql_requests(emulator: Emulator) -> list[Any]:
    return [r for r in emulator.service.recent if r.path == "/graphql"]


def error_code(response: httpx.Response) -> str:
    errors = response.json()["errors"]
    assert isinstance(errors[0]["message"], str)
    return str(errors[0]["extensions"]["code"])


async def test_get_user_through_the_unix_socket(
    autojump_clock: trio.testing.MockClock, proxied: Broker, client: httpx.AsyncClient
) -> None:
    await proxied.login()
    response = await client.post("/graphql", json=GET_USER)
    assert response.status_code == 200
    assert response.json()["data"]["getUser"]["email"] == DEMO_USER


async def test_header_rules(
    autojump_clock: trio.testing.MockClock, proxied: Broker, client: httpx.AsyncClient
) -> None:
    await proxied.login()
    bearer = proxied.profile().session.tokens.bearer.reveal()  # type: ignore[union-attr]
    response = await client.post(
        "/graphql?debug=1",
        content=json.dumps(GET_USER).encode(),
        headers={
            "Authorization": "Bearer the-callers-own",
            "x-apikey": "the-callers-key",
            "Accept": "application/graphql-response+json",
            "Content-Type": "application/json; charset=utf-8",
            "x-request-id": "req-1",
            "x-idempotency-key": "idem-1",
            "Connection": "keep-alive, x-private",
            "x-private": "for this hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eDp5",
            "Geins-Broker-Profile": "default",
            "x-custom": "passes",
        },
    )
    assert response.status_code == 200
    sent = graphql_requests(proxied.emulator)[-1]
    assert sent.target == "/graphql?debug=1"
    assert sent.headers["authorization"] == f"Bearer {bearer}"
    assert sent.headers["x-apikey"] == "demo-api-key"
    assert sent.headers["accept"] == "application/graphql-response+json"
    assert sent.headers["content-type"] == "application/json; charset=utf-8"
    assert sent.headers["x-request-id"] == "req-1"
    assert sent.headers["x-idempotency-key"] == "idem-1"
    assert sent.headers["x-custom"] == "passes"
    assert sent.headers["host"] == proxied.emulator.url.removeprefix("http://")
    for gone in ("x-private", "keep-alive", "te", "proxy-authorization", "geins-broker-profile"):
        assert gone not in sent.headers, gone
    assert sent.headers.get("connection", "keep-alive") == "keep-alive"  # httpx's own, if any
    assert json.loads(sent.body) == GET_USER


async def test_the_header_picks_the_profile(
    autojump_clock: trio.testing.MockClock, proxied: Broker, client: httpx.AsyncClient
) -> None:
    await proxied.login("other")
    assert (await client.post("/graphql", json=GET_USER)).status_code == 401  # default: none
    picked = await client.post("/graphql", json=GET_USER, headers={"Geins-Broker-Profile": "other"})
    assert picked.status_code == 200
    other_bearer = proxied.profile("other").session.tokens.bearer.reveal()  # type: ignore[union-attr]
    assert graphql_requests(proxied.emulator)[-1].headers["authorization"].endswith(other_bearer)


async def test_a_request_at_the_instant_of_expiry_is_served_by_one_refresh(
    autojump_clock: trio.testing.MockClock,
    proxied: Broker,
    client: httpx.AsyncClient,
    wall: TrioWallClock,
) -> None:
    await proxied.login()
    tokens = proxied.profile().session.tokens
    assert tokens is not None
    wall.step(tokens.expires_at - wall.now())  # the bearer expires now
    response = await client.post("/graphql", json=GET_USER)
    assert response.status_code == 200
    counts = proxied.emulator.service.counts
    assert counts["GET /login"] == 1
    assert counts["graphql UserGet"] == 1
    assert proxied.profile().session.tokens is not tokens


async def test_a_bearer_with_too_little_left_is_refreshed_though_it_served_just_before(
    autojump_clock: trio.testing.MockClock,
    proxied: Broker,
    client: httpx.AsyncClient,
    wall: TrioWallClock,
) -> None:
    """The proxy keeps what a profile's requests need while its bearer serves; once
    less than `min_valid` is left, the next request gets a fresh bearer, not that one."""
    await proxied.login()
    tokens = proxied.profile().session.tokens
    assert tokens is not None
    assert (await client.post("/graphql", json=GET_USER)).status_code == 200
    wall.step(tokens.expires_at - 10 - wall.now())  # 10 s left, under min_valid (30 s)
    assert (await client.post("/graphql", json=GET_USER)).status_code == 200
    fresh = proxied.profile().session.tokens
    assert fresh is not None and fresh is not tokens
    sent = graphql_requests(proxied.emulator)[-1].headers["authorization"]
    assert sent == f"Bearer {fresh.bearer.reveal()}"


async def _skewed_broker(
    nursery: trio.Nursery, wall: TrioWallClock, tmp: Path
) -> tuple[Broker, list[float]]:
    """A broker whose emulator's clock runs `skew[0]` seconds ahead of the daemon's:
    Geins then refuses bearers the daemon believes have time left."""
    skew = [0.0]
    emulator = Emulator(clock=lambda: wall.now() + skew[0], token_ttl=900.0)
    await emulator.start(nursery)
    return await start_broker(nursery, emulator, wall, tmp), skew


async def test_an_upstream_401_renews_once_and_retries_with_the_same_request(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker, skew = await _skewed_broker(nursery, wall, short_tmp)
    await broker.login()
    await trio.sleep(60)
    skew[0] = 900.0  # Geins: expired; the daemon: 840 s left
    mutation = {
        "operationName": "UserUpdate",
        "query": "mutation UserUpdate($user: UserInputType!) { updateUser(user: $user) { id } }",
        "variables": {"user": {"firstName": "Ada"}},
    }
    async with proxy_client(broker) as client:
        response = await client.post(
            "/graphql", json=mutation, headers={"x-idempotency-key": "idem-42"}
        )
    assert response.status_code == 200
    assert response.json()["data"]["updateUser"]["firstName"] == "Ada"
    first, second = graphql_requests(broker.emulator)
    assert broker.emulator.service.counts["GET /login"] == 1
    assert first.headers["x-idempotency-key"] == second.headers["x-idempotency-key"] == "idem-42"
    assert first.body == second.body
    assert first.headers["authorization"] != second.headers["authorization"]


async def test_a_fresh_bearer_refused_is_not_rotated_again(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    """A 401 for a bearer seconds old is about something else: no refresh storm."""
    broker, skew = await _skewed_broker(nursery, wall, short_tmp)
    await broker.login()
    skew[0] = 900.0
    async with proxy_client(broker) as client:
        for _ in range(5):
            assert (await client.post("/graphql", json=GET_USER)).status_code == 401
    assert broker.emulator.service.counts["GET /login"] == 0


@pytest.mark.parametrize("why", ["expiry", "upstream_401"])
async def test_100_concurrent_requests_during_a_rotation_need_one_refresh(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    wall: TrioWallClock,
    short_tmp: Path,
    why: str,
) -> None:
    broker, skew = await _skewed_broker(nursery, wall, short_tmp)
    await broker.login()
    await trio.sleep(60)
    if why == "expiry":
        tokens = broker.profile().session.tokens
        assert tokens is not None
        wall.step(tokens.expires_at - wall.now() - 1)
    else:
        skew[0] = 900.0
    statuses: list[int] = []
    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(
                uds=str(broker.socket.parent / "merchant.sock"), limits=limits
            ),
            base_url="http://geins",
            timeout=120,
        ) as client,
        trio.open_nursery() as requests,
    ):

        async def one() -> None:
            statuses.append((await client.post("/graphql", json=GET_USER)).status_code)

        for _ in range(100):
            requests.start_soon(one)
    assert statuses == [200] * 100
    assert broker.emulator.service.counts["GET /login"] == 1


# -- errors are answers ------------------------------------------------------------------------


async def test_not_logged_in_and_unknown_profile(
    autojump_clock: trio.testing.MockClock, client: httpx.AsyncClient
) -> None:
    response = await client.post("/graphql", json=GET_USER)
    assert (response.status_code, error_code(response)) == (401, "not_logged_in")
    assert response.headers["content-type"] == "application/json"
    unknown = await client.post("/graphql", json=GET_USER, headers={"Geins-Broker-Profile": "x"})
    assert (unknown.status_code, error_code(unknown)) == (404, "unknown_profile")


async def test_login_required(
    autojump_clock: trio.testing.MockClock, proxied: Broker, client: httpx.AsyncClient
) -> None:
    await proxied.login()
    proxied.emulator.service.revoke_user(DEMO_USER)
    tokens = proxied.profile().session.tokens
    assert tokens is not None
    proxied.daemon.wall.step(tokens.expires_at - proxied.daemon.wall.now())  # type: ignore[attr-defined]
    response = await client.post("/graphql", json=GET_USER)
    assert (response.status_code, error_code(response)) == (401, "login_required")


async def test_geins_unreachable_is_502(
    autojump_clock: trio.testing.MockClock, proxied: Broker, client: httpx.AsyncClient
) -> None:
    await proxied.login()
    proxied.emulator.server.refuse(600)
    response = await client.post("/graphql", json=GET_USER)
    assert (response.status_code, error_code(response)) == (502, "upstream_unavailable")


async def test_upstream_timeout_is_504(
    autojump_clock: trio.testing.MockClock, proxied: Broker, client: httpx.AsyncClient
) -> None:
    await proxied.login()
    await _fault(proxied, {"kind": "latency", "match": "/graphql", "seconds": 31})
    response = await client.post("/graphql", json=GET_USER)
    assert (response.status_code, error_code(response)) == (504, "timeout")
    assert trio.current_time() < 200  # it did not wait for the 31 s answer forever


async def test_upstream_errors_and_broken_answers_reach_the_caller(
    autojump_clock: trio.testing.MockClock, proxied: Broker, client: httpx.AsyncClient
) -> None:
    await proxied.login()
    await _fault(proxied, {"kind": "status", "match": "/graphql", "status": 503, "times": 1})
    assert (await client.post("/graphql", json=GET_USER)).status_code == 503  # Geins' own
    await _fault(proxied, {"kind": "truncate", "match": "/graphql", "times": 1})
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/graphql", json=GET_USER)
    assert (await client.post("/graphql", json=GET_USER)).status_code == 200


async def _fault(broker: Broker, spec: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as control:
        answer = await control.post(f"{broker.emulator.url}/_emulator/faults", json=spec)
        assert answer.status_code == 200


# -- hostile input -------------------------------------------------------------------------


async def raw(broker: Broker) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(broker.socket.parent / "merchant.sock"))
    return sock


async def read_all(sock: trio.socket.SocketType, *, reset_ok: bool = False) -> bytes:
    """Everything until the proxy closes the connection. `reset_ok`: a peer that is
    still sending when the proxy's lingering close gives up gets a reset (after the
    answer), as from any server."""
    data = b""
    try:
        while chunk := await sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        if not (reset_ok and data):
            raise
    return data


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


HEAD = b"POST /graphql HTTP/1.1\r\nHost: geins\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /graphql HTTP/1.1\r\nHost: geins\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (HEAD + b"Content-Length: 10485761\r\n\r\n", 413),
        (HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400),
    ],
    ids=["garbage", "header_too_large", "declared_body_too_large", "conflicting_lengths"],
)
async def test_bad_input_gets_a_4xx_and_a_clean_close(
    autojump_clock: trio.testing.MockClock, proxied: Broker, request_bytes: bytes, status: int
) -> None:
    sock = await raw(proxied)
    with sock:
        await sock.send(request_bytes)
        answer = await read_all(sock)
    assert status_of(answer) == status
    assert b"connection: close" in answer.lower()
    assert b'"errors"' in answer


async def test_a_chunked_body_over_the_limit_is_413(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(
        nursery, emulator, wall, short_tmp, proxy={"max_body_size": 512 * 1024}
    )
    await broker.login()
    sock = await raw(broker)
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
    with sock:
        await sock.send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        async with trio.open_nursery() as senders:

            async def flood() -> None:
                stream = trio.SocketStream(sock)
                try:
                    for _ in range(12):
                        await stream.send_all(chunk)
                except trio.BrokenResourceError:
                    pass  # the proxy stopped reading: expected

            senders.start_soon(flood)
            answer = await read_all(sock, reset_ok=True)
    assert status_of(answer) == 413
    assert b"request_too_large" in answer
    assert graphql_requests(broker.emulator) == []


class OffsetWall:
    """Real wall time plus an offset the test moves."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset


async def test_a_large_body_streams_through_and_is_not_retried(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    """Real time: megabytes through real sockets must not race a mock clock's jumps."""
    daemon_wall, emulator_wall = OffsetWall(), OffsetWall()
    emulator = Emulator(clock=emulator_wall.now, token_ttl=900.0)
    await emulator.start(nursery)
    broker = await start_broker(nursery, emulator, daemon_wall, short_tmp)
    await broker.login()
    daemon_wall.offset = 60.0  # the bearer is a minute old: old enough to renew on a 401
    emulator_wall.offset = 60.0
    big = {**GET_USER, "variables": {"padding": "x" * (3 * 1024 * 1024)}}
    async with proxy_client(broker) as client:
        assert (await client.post("/graphql", json=big)).status_code == 200
        assert len(graphql_requests(broker.emulator)[-1].body) > 3 * 1024 * 1024
        emulator_wall.offset = 960.0  # Geins: expired; the daemon: 840 s left
        assert (await client.post("/graphql", json=big)).status_code == 401  # not replayable
        assert broker.emulator.service.counts["GET /login"] == 0
        assert (await client.post("/graphql", json=GET_USER)).status_code == 200  # renewed
    assert broker.emulator.service.counts["GET /login"] == 1


async def test_slowloris_is_cut_off(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    """A byte a second never completes a head: the connection ends at header_timeout
    (10 s) plus the lingering close (2 s), however long the peer would go on."""
    sock = await raw(proxied)
    start = trio.current_time()
    with sock:
        try:
            for byte in HEAD * 10:
                await sock.send(bytes([byte]))
                await trio.sleep(1)
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off
    assert trio.current_time() - start <= 13


async def test_a_half_sent_head_gets_408(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    sock = await raw(proxied)
    with sock:
        await sock.send(HEAD[:30])
        start = trio.current_time()
        answer = await read_all(sock)
    assert status_of(answer) == 408
    assert b"request_timeout" in answer
    assert trio.current_time() - start == pytest.approx(10.0, abs=2.5)


async def test_a_silent_connection_is_closed_after_the_idle_timeout(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    sock = await raw(proxied)
    with sock:
        start = trio.current_time()
        assert await read_all(sock) == b""
    assert trio.current_time() - start == pytest.approx(60.0, abs=1)


async def test_a_trickled_body_times_out(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    await proxied.login()
    sock = await raw(proxied)
    with sock:
        await sock.send(HEAD + b"Content-Length: 100\r\n\r\n{")
        answer = await read_all(sock)
    assert status_of(answer) == 408
    assert graphql_requests(proxied.emulator) == []


async def test_connections_beyond_the_limit_get_503(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
) -> None:
    broker = await start_broker(nursery, emulator, wall, short_tmp, proxy={"max_connections": 2})
    held = [await raw(broker), await raw(broker)]
    await trio.testing.wait_all_tasks_blocked()
    extra = await raw(broker)
    with extra:
        answer = await read_all(extra)
    assert status_of(answer) == 503
    for sock in held:
        sock.close()


async def test_an_absolute_target_is_refused(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    await proxied.login()
    sock = await raw(proxied)
    with sock:
        await sock.send(
            b"GET http://example.com/x HTTP/1.1\r\nHost: geins\r\nConnection: close\r\n\r\n"
        )
        answer = await read_all(sock)
    assert status_of(answer) == 400
    assert proxied.emulator.service.recent[-1].path != "/x"


async def test_a_tcp_peer_nobody_can_place_is_refused(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    short_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """sock_diag and /proc/net both unable to say (another namespace, a hidden /proc):
    the connection is refused, whoever it is."""
    from broker.proxy import peers

    monkeypatch.setattr(peers, "_uid_by_sock_diag", lambda *a: None)
    broker = await start_broker(nursery, emulator, wall, short_tmp, proxy={"tcp": "127.0.0.1:0"})
    await broker.login()
    assert broker.daemon.proxy is not None and broker.daemon.proxy.tcp_address is not None
    host, port = broker.daemon.proxy.tcp_address
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        response = await client.post("/graphql", json=GET_USER)
    assert (response.status_code, error_code(response)) == (403, "forbidden")
    assert graphql_requests(emulator) == []


async def test_a_stop_lets_a_proxied_request_finish(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    await proxied.login()
    await _fault(proxied, {"kind": "latency", "match": "/graphql", "seconds": 3, "times": 1})
    statuses: list[int] = []
    async with proxy_client(proxied) as client, trio.open_nursery() as nursery:

        async def slow_request() -> None:
            statuses.append((await client.post("/graphql", json=GET_USER)).status_code)

        nursery.start_soon(slow_request)
        await trio.sleep(1)  # the request is waiting on Geins
        proxy = proxied.daemon.proxy
        assert proxy is not None
        assert proxy.in_flight == 1
        proxied.daemon.stop()
    assert statuses == [200]
    assert not (proxied.socket.parent / "merchant.sock").exists()


async def test_expect_100_continue(autojump_clock: trio.testing.MockClock, proxied: Broker) -> None:
    """curl asks before sending a large body; the proxy says go on when it reads it."""
    await proxied.login()
    body = json.dumps(GET_USER).encode()
    sock = await raw(proxied)
    with sock:
        await sock.send(
            HEAD
            + b"Expect: 100-continue\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        await sock.send(body)
        answer = await read_all(sock)
    assert status_of(answer) == 200
    assert DEMO_USER.encode() in answer
    assert graphql_requests(proxied.emulator)[-1].headers.get("expect") is None


async def test_a_reload_applies_new_limits(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    """What a SIGHUP hands the proxy (Daemon.reload -> Proxy.configure)."""
    await proxied.login()
    new = broker_config(
        proxied.emulator,
        proxied.socket,
        proxied.state_dir,
        profiles=("default", "other"),
        proxy={"max_body_size": 1000},
    )
    proxied.daemon.proxy.configure(new)  # type: ignore[union-attr]
    async with proxy_client(proxied) as client:
        small = await client.post("/graphql", json=GET_USER)
        large = await client.post("/graphql", json={**GET_USER, "variables": {"x": "y" * 2000}})
    assert (small.status_code, large.status_code) == (200, 413)


async def test_pipelined_requests_are_answered_in_order(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    """Three requests in one write: three answers, in order, on the one connection."""
    await proxied.login()
    body = json.dumps(GET_USER).encode()
    one = HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    last = HEAD + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    sock = await raw(proxied)
    with sock:
        await sock.send(one + b"GET /healthz-not HTTP/1.1\r\nHost: geins\r\n\r\n" + last)
        answer = await read_all(sock)
    statuses = [int(found) for found in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]
    assert statuses == [200, 404, 200]  # the emulator knows no /healthz-not
    assert [r.target for r in graphql_requests(proxied.emulator)][-2:] == ["/graphql", "/graphql"]


async def test_a_caller_that_shuts_its_side_still_gets_its_answer(
    autojump_clock: trio.testing.MockClock, proxied: Broker
) -> None:
    await proxied.login()
    body = json.dumps(GET_USER).encode()
    sock = await raw(proxied)
    with sock:
        await sock.send(HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        sock.shutdown(socket.SHUT_WR)
        answer = await read_all(sock)
    assert status_of(answer) == 200
    assert DEMO_USER.encode() in answer
