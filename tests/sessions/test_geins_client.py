"""The Geins client against the emulator, over real loopback sockets.

Time is trio's MockClock (autojump): a 10-second request timeout or a 30-second
Retry-After costs nothing, and both processes' "now" is the same virtual wall clock.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock

from broker.core.clock import TrioWallClock
from broker.core.errors import (
    InvalidCredentials,
    MalformedAnswer,
    RefreshTokenRejected,
    Transient,
    UnusableGrant,
    UpstreamRejected,
    UpstreamTimeout,
)
from broker.core.secret import Secret
from broker.emulator.app import Emulator
from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from broker.geins import claims
from broker.geins.protocol import Grant, password_digest
from broker.sessions.geins_client import GeinsClient

PASSWORD = Secret(DEMO_PASSWORD)


@pytest.fixture
def geins(emulator: Emulator, http: httpx.AsyncClient) -> GeinsClient:
    return GeinsClient(emulator.endpoint(), http)


async def control(
    http: httpx.AsyncClient,
    emulator: Emulator,
    method: str,
    action: str,
    body: dict[str, Any] | None = None,
) -> Any:
    response = await http.request(method, f"{emulator.url}/_emulator/{action}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_login_sends_exactly_what_the_sdk_sends(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, wall: TrioWallClock
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    challenge, sign, login = list(emulator.service.recent)[-3:]
    assert (challenge.method, challenge.path) == ("POST", "/api/demo_prod/login")
    assert json.loads(challenge.body) == {"username": DEMO_USER}
    assert challenge.headers["content-type"] == "application/json"
    assert sign.method == "GET"
    assert sign.path == "/auth/sign/demo-api-key"
    assert "%2B" in sign.query or "%2F" in sign.query  # encodeURIComponent escaping
    assert sign.headers["content-type"] == "application/json"
    body = json.loads(login.body)
    assert list(body) == ["username", "signature", "password", "sessionLifetime"]
    assert body["password"] == password_digest(DEMO_PASSWORD)
    assert body["sessionLifetime"] == 30
    assert set(body["signature"]) == {"identity", "signature", "timestamp"}
    assert grant.max_age == 1800
    assert claims.decode(grant.bearer.reveal()).exp == int(wall.now()) + 900


async def test_remembered_login_omits_session_lifetime(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=True)
    assert "sessionLifetime" not in json.loads(emulator.service.recent[-1].body)
    assert grant.max_age == 7 * 24 * 3600


async def test_refresh_rotates(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator
) -> None:
    first = await geins.login(DEMO_USER, PASSWORD, remember=False)
    second = await geins.refresh(first.refresh)
    request = emulator.service.recent[-1]
    assert (request.method, request.path, request.body) == ("GET", "/api/demo_prod/login", b"")
    assert request.headers["x-auth-refresh-token"] == first.refresh.reveal()
    assert request.headers["content-type"] == "application/json"
    assert second.refresh != first.refresh
    with pytest.raises(RefreshTokenRejected):
        await geins.refresh(first.refresh)
    await geins.refresh(second.refresh)


async def test_change_password(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    new = Secret("correct horse battery staple")
    with pytest.raises(InvalidCredentials):
        await geins.change_password(grant.refresh, DEMO_USER, Secret("wrong"), new)
    changed = await geins.change_password(grant.refresh, DEMO_USER, PASSWORD, new)
    request = emulator.service.recent[-1]
    assert request.path == "/api/demo_prod/password"
    assert request.headers["x-auth-refresh-token"] == grant.refresh.reveal()
    body = json.loads(request.body)
    assert list(body) == ["username", "signature", "password", "newPassword"]
    assert body["newPassword"] == password_digest(new.reveal())
    with pytest.raises(RefreshTokenRejected):
        await geins.refresh(grant.refresh)
    await geins.refresh(changed.refresh)
    with pytest.raises(InvalidCredentials):
        await geins.login(DEMO_USER, PASSWORD, remember=False)
    await geins.login(DEMO_USER, new, remember=False)


async def test_register_commits_the_user(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator
) -> None:
    grant = await geins.register(
        "new@example.com", Secret("pw"), {"newsletter": True, "customerType": "ORGANIZATION"}
    )
    commit = emulator.service.recent[-1]
    assert commit.path == "/graphql"
    assert commit.headers["x-apikey"] == "demo-api-key"
    assert commit.headers["authorization"] == f"Bearer {grant.bearer.reveal()}"
    assert commit.headers["accept"] == "application/json"
    body = json.loads(commit.body)
    assert body["operationName"] == "UserCreate"
    assert body["variables"] == {
        "user": {"newsletter": True, "customerType": "ORGANIZATION"},
        "channelId": "1|se",
        "languageId": "sv-SE",
        "marketId": "se",
    }
    assert "updateUser(" in body["query"]
    assert emulator.service.user_committed("new@example.com")
    register = json.loads(emulator.service.recent[-2].body)
    assert list(register) == ["username", "signature", "password"]


async def test_register_default_user_and_taken_name(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator
) -> None:
    await geins.register("x@example.com", Secret("pw"))
    assert json.loads(emulator.service.recent[-1].body)["variables"]["user"] == {
        "newsletter": False,
        "customerType": "PERSON",
    }
    with pytest.raises(InvalidCredentials, match="already registered"):
        await geins.register(DEMO_USER, Secret("pw"))


async def test_logout(autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    await geins.logout(grant.refresh)
    assert emulator.service.recent[-1].headers["x-auth-refresh-token"] == grant.refresh.reveal()
    with pytest.raises(RefreshTokenRejected):
        await geins.refresh(grant.refresh)


async def test_wrong_password(autojump_clock: MockClock, geins: GeinsClient) -> None:
    with pytest.raises(InvalidCredentials) as info:
        await geins.login(DEMO_USER, Secret("not-it"), remember=False)
    assert "not-it" not in str(info.value)


async def test_wrong_api_key_is_rejected_not_transient(
    autojump_clock: MockClock, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    geins = GeinsClient(emulator.endpoint(api_key="bad-key"), http)
    with pytest.raises(UpstreamRejected) as info:
        await geins.login(DEMO_USER, PASSWORD, remember=False)
    assert "bad-key" not in str(info.value)


async def test_revoked_refresh_token(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    assert await control(http, emulator, "POST", "revoke", {"username": DEMO_USER}) == {
        "revoked": 1
    }
    with pytest.raises(RefreshTokenRejected):
        await geins.refresh(grant.refresh)


async def test_server_error_is_transient(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    await control(http, emulator, "POST", "faults", {"kind": "status", "status": 503, "times": 1})
    with pytest.raises(Transient) as info:
        await geins.refresh(grant.refresh)
    assert info.value.retry_after is None
    assert "503" in str(info.value)
    await geins.refresh(grant.refresh)  # the fault was for one request; the token still works


async def test_429_carries_retry_after(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    await control(
        http,
        emulator,
        "POST",
        "faults",
        {"kind": "status", "status": 429, "retry_after": "30", "match": "GET /api"},
    )
    with pytest.raises(Transient) as info:
        await geins.refresh(grant.refresh)
    assert info.value.retry_after == 30.0
    assert info.value.code == "upstream_unavailable"
    stats = await control(http, emulator, "GET", "stats")
    assert stats["counts"]["fault 429"] == 1


async def test_connection_refused_is_transient(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    await control(http, emulator, "POST", "faults", {"kind": "refuse", "seconds": 60})
    # The first request may still go out on the pooled connection the emulator is
    # closing (a RemoteProtocolError); either way it is transient, and the next is refused.
    with pytest.raises(Transient):
        await geins.login(DEMO_USER, PASSWORD, remember=False)
    with pytest.raises(Transient, match="ConnectError"):
        await geins.login(DEMO_USER, PASSWORD, remember=False)
    await trio.sleep(61)  # the listener reopens by itself
    await geins.login(DEMO_USER, PASSWORD, remember=False)


async def test_latency_beyond_the_timeout(
    autojump_clock: MockClock, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    geins = GeinsClient(emulator.endpoint(), http, timeout=10.0)
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    await control(http, emulator, "POST", "faults", {"kind": "latency", "seconds": 11, "times": 1})
    start = trio.current_time()
    with pytest.raises(UpstreamTimeout) as info:
        await geins.refresh(grant.refresh)
    assert trio.current_time() - start == pytest.approx(10.0)
    assert info.value.code == "timeout"
    # The request was still queued when the client gave up, so it never took effect:
    # the refresh token still works.
    await trio.sleep(2)
    await geins.refresh(grant.refresh)


async def test_late_answer_after_the_service_acted(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    """The hazard of strict rotation: the service rotated, the answer never arrived."""
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    await control(
        http,
        emulator,
        "POST",
        "faults",
        {"kind": "latency", "seconds": 11, "after": True, "times": 1},
    )
    with pytest.raises(UpstreamTimeout):
        await geins.refresh(grant.refresh)
    with pytest.raises(RefreshTokenRejected):
        await geins.refresh(grant.refresh)


async def test_latency_within_the_timeout_succeeds(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    await control(http, emulator, "POST", "faults", {"kind": "latency", "seconds": 4})
    start = trio.current_time()
    await geins.login(DEMO_USER, PASSWORD, remember=False)
    assert trio.current_time() - start == pytest.approx(12.0)  # three requests, 4 s each


async def test_stall_times_out_and_clears(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    await control(http, emulator, "POST", "faults", {"kind": "stall", "match": "GET /api"})
    with pytest.raises(UpstreamTimeout):
        await geins.refresh(grant.refresh)
    await control(http, emulator, "DELETE", "faults")
    await geins.refresh(grant.refresh)


async def test_fault_for_a_duration_lapses(
    autojump_clock: MockClock, geins: GeinsClient, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    await control(http, emulator, "POST", "faults", {"kind": "status", "status": 500, "for": 30})
    with pytest.raises(Transient):
        await geins.login(DEMO_USER, PASSWORD, remember=False)
    await trio.sleep(30)
    await geins.login(DEMO_USER, PASSWORD, remember=False)


async def test_bad_fault_spec_is_refused(
    autojump_clock: MockClock, emulator: Emulator, http: httpx.AsyncClient
) -> None:
    response = await http.post(f"{emulator.url}/_emulator/faults", json={"kind": "explode"})
    assert response.status_code == 400


def _mock_client(handler: Any) -> GeinsClient:
    from broker.geins.protocol import Endpoint

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return GeinsClient(Endpoint(account="a", api_key="k"), http)


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(200, json={"token": "x.y.z", "maxAge": 60}),
            "without a x-auth-refresh-token",
        ),
        (httpx.Response(200, headers={"x-auth-refresh-token": "r"}), "empty body"),
        (httpx.Response(200, headers={"x-auth-refresh-token": "r"}, content=b"<html>"), "not JSON"),
        (httpx.Response(200, headers={"x-auth-refresh-token": "r"}, json=[1]), "not an object"),
        (
            httpx.Response(200, headers={"x-auth-refresh-token": "r"}, json={"maxAge": 1}),
            "without a token",
        ),
        (
            httpx.Response(
                200, headers={"x-auth-refresh-token": "r"}, json={"token": "t", "maxAge": "x"}
            ),
            "maxAge",
        ),
    ],
)
async def test_malformed_answers(
    autojump_clock: MockClock, response: httpx.Response, message: str
) -> None:
    geins = _mock_client(lambda request: response)
    with pytest.raises(MalformedAnswer, match=message):
        await geins.refresh(Secret("refresh-secret"))


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502</html>",
        b'{"token": "' + b"x" * (64 * 1024 + 1) + b'"}',
        b'{"token": "t", "maxAge": 1e300}',
    ],
)
async def test_an_unusable_answer_still_hands_over_the_rotated_refresh_token(
    autojump_clock: MockClock, body: bytes
) -> None:
    """An answer whose body is unusable (garbage, absurd times, a giant bearer): the new
    refresh token in its header is never lost, nor shown."""
    response = httpx.Response(200, headers={"x-auth-refresh-token": "new-refresh"}, content=body)
    geins = _mock_client(lambda request: response)
    with pytest.raises(UnusableGrant) as info:
        await geins.refresh(Secret("refresh-secret"))
    assert info.value.refresh.reveal() == "new-refresh"
    assert "new-refresh" not in str(info.value) + repr(info.value) + repr(info.value.args)


async def test_an_answer_declared_over_a_megabyte_is_not_read(autojump_clock: MockClock) -> None:
    """A hostile upstream's gigabyte answer is refused before it is read."""
    response = httpx.Response(
        200, headers={"x-auth-refresh-token": "r"}, content=b"x" * (1024 * 1024 + 1)
    )
    geins = _mock_client(lambda request: response)
    with pytest.raises(MalformedAnswer, match="more than 1048576 bytes"):
        await geins.refresh(Secret("refresh-secret"))


# Cutting a stream short leaves httpx's inner generators (aiter_bytes, aiter_raw, the
# transport's stream) to the garbage collector, which trio reports.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_an_endless_answer_is_cut_off_at_a_megabyte(autojump_clock: MockClock) -> None:
    sent = 0

    async def endless() -> Any:
        nonlocal sent
        for _ in range(1000):
            sent += 65536
            yield b"x" * 65536

    response = httpx.Response(200, headers={"x-auth-refresh-token": "r"}, content=endless())
    geins = _mock_client(lambda request: response)
    with pytest.raises(MalformedAnswer, match="more than 1048576 bytes"):
        await geins.refresh(Secret("refresh-secret"))
    assert sent <= 1024 * 1024 + 65536


async def test_an_oversized_refresh_token_is_refused(autojump_clock: MockClock) -> None:
    big = "r" * (4 * 1024 + 1)
    response = httpx.Response(200, headers={"x-auth-refresh-token": big}, json={"token": "t"})
    geins = _mock_client(lambda request: response)
    with pytest.raises(MalformedAnswer, match="refresh token of 4097 characters") as info:
        await geins.refresh(Secret("refresh-secret"))
    assert not isinstance(info.value, UnusableGrant)


async def test_challenge_without_sign_is_malformed(
    autojump_clock: MockClock,
) -> None:
    geins = _mock_client(lambda request: httpx.Response(200, json={"nope": 1}))
    with pytest.raises(MalformedAnswer, match="without a sign"):
        await geins.login("u", Secret("p"), remember=True)


async def test_grant_repr_and_errors_hold_no_secret(
    autojump_clock: MockClock, geins: GeinsClient
) -> None:
    grant = await geins.login(DEMO_USER, PASSWORD, remember=False)
    assert isinstance(grant, Grant)
    text = repr(grant)
    assert grant.bearer.reveal() not in text
    assert grant.refresh.reveal() not in text
    assert DEMO_PASSWORD not in text
