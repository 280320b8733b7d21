"""The emulator's strictness, tested on the pure model with requests shaped like the SDK's.

`Sdk` below writes each request the way the official TypeScript SDK's
authServiceClient.ts builds it (method, path, headers, JSON.stringify field order),
independently of broker.geins, so the emulator is checked against the SDK itself.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.emulator.model.service import AuthService, ServiceConfig
from broker.emulator.model.values import HttpRequest, HttpResponse
from broker.geins import claims
from broker.geins.protocol import encode_uri_component, password_digest

AUTH = "/api/shop_prod"
KEY = "merchant-key"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


class Sdk:
    def __init__(self, service: AuthService) -> None:
        self.service = service

    def send(self, method: str, target: str, body: Any = None, **headers: str) -> HttpResponse:
        all_headers = {"content-type": "application/json", **headers}
        raw = b"" if body is None else json.dumps(body).encode()
        return self.service.handle(HttpRequest(method, target, all_headers, raw))

    def challenge(self, username: str) -> str:
        response = self.send("POST", f"{AUTH}/login", {"username": username})
        assert response.status == 200
        return str(json.loads(response.body)["sign"])

    def signature(self, username: str, key: str = KEY) -> dict[str, str]:
        sign = self.challenge(username)
        response = self.send("GET", f"/auth/sign/{key}?identity={encode_uri_component(sign)}")
        assert response.status == 200, response.body
        return dict(json.loads(response.body))

    def login(self, username: str, password: str, remember: bool = False) -> HttpResponse:
        body: dict[str, Any] = {
            "username": username,
            "signature": self.signature(username),
            "password": password_digest(password),
        }
        if not remember:
            body["sessionLifetime"] = 30
        return self.send("POST", f"{AUTH}/login", body)

    def refresh(self, token: str) -> HttpResponse:
        return self.send("GET", f"{AUTH}/login", **{"x-auth-refresh-token": token})


def refresh_of(response: HttpResponse) -> str:
    return dict(response.headers)["x-auth-refresh-token"]


def body_of(response: HttpResponse) -> dict[str, Any]:
    return dict(json.loads(response.body))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(clock: Clock) -> AuthService:
    config = ServiceConfig(account="shop", environment="prod", api_key=KEY, token_ttl=900)
    return AuthService(config, {"ada@example.com": "s3cret"}, clock=clock)


@pytest.fixture
def sdk(service: AuthService) -> Sdk:
    return Sdk(service)


def test_login_issues_namespaced_jwt_and_session_lifetime(sdk: Sdk, clock: Clock) -> None:
    response = sdk.login("ada@example.com", "s3cret")
    assert response.status == 200
    body = body_of(response)
    assert body["maxAge"] == 30 * 60
    assert refresh_of(response)
    raw = claims.payload(body["token"])
    assert any("/" in key for key in json.loads(_b64_payload(body["token"])))
    decoded = claims.decode(body["token"])
    assert decoded.exp == int(clock.t) + 900
    assert decoded.username == "ada@example.com"
    assert raw["customerType"] == "PERSON"


def _b64_payload(token: str) -> bytes:
    import base64

    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def test_remembered_login_gets_the_long_session(sdk: Sdk) -> None:
    response = sdk.login("ada@example.com", "s3cret", remember=True)
    assert body_of(response)["maxAge"] == 7 * 24 * 3600


def test_wrong_password_is_401(sdk: Sdk) -> None:
    assert sdk.login("ada@example.com", "wrong").status == 401
    assert sdk.login("nobody@example.com", "s3cret").status == 401


def test_signature_only_for_the_right_key(sdk: Sdk) -> None:
    sign = sdk.challenge("ada@example.com")
    response = sdk.send("GET", f"/auth/sign/other-key?identity={encode_uri_component(sign)}")
    assert response.status == 401


def test_signature_is_single_use(sdk: Sdk) -> None:
    signature = sdk.signature("ada@example.com")
    body = {
        "username": "ada@example.com",
        "signature": signature,
        "password": password_digest("s3cret"),
    }
    assert sdk.send("POST", f"{AUTH}/login", body).status == 200
    assert sdk.send("POST", f"{AUTH}/login", body).status == 401


def test_signature_expires(sdk: Sdk, clock: Clock) -> None:
    signature = sdk.signature("ada@example.com")
    clock.t += 61
    body = {
        "username": "ada@example.com",
        "signature": signature,
        "password": password_digest("s3cret"),
    }
    assert sdk.send("POST", f"{AUTH}/login", body).status == 401


def test_forged_signature_is_refused(sdk: Sdk) -> None:
    signature = sdk.signature("ada@example.com")
    signature["signature"] = signature["signature"][::-1]
    body = {
        "username": "ada@example.com",
        "signature": signature,
        "password": password_digest("s3cret"),
    }
    assert sdk.send("POST", f"{AUTH}/login", body).status == 401


def test_signature_is_bound_to_the_username(sdk: Sdk, service: AuthService) -> None:
    service.add_user("eve@example.com", "x")
    signature = sdk.signature("ada@example.com")
    body = {"username": "eve@example.com", "signature": signature, "password": password_digest("x")}
    assert sdk.send("POST", f"{AUTH}/login", body).status == 401


def test_unescaped_challenge_does_not_sign(sdk: Sdk) -> None:
    """A client that skips encodeURIComponent sends `+` raw; it must not match."""
    sign = sdk.challenge("ada@example.com")
    assert "+" in sign
    response = sdk.send("GET", f"/auth/sign/{KEY}?identity={sign}")
    signature = body_of(response)
    assert signature["identity"] != sign
    body = {
        "username": "ada@example.com",
        "signature": signature,
        "password": password_digest("s3cret"),
    }
    assert sdk.send("POST", f"{AUTH}/login", body).status == 401


def test_password_must_be_the_digest_not_the_clear_text(sdk: Sdk) -> None:
    body = {
        "username": "ada@example.com",
        "signature": sdk.signature("ada@example.com"),
        "password": "s3cret",
    }
    assert sdk.send("POST", f"{AUTH}/login", body).status == 400


def test_unknown_fields_and_content_type_are_refused(sdk: Sdk, service: AuthService) -> None:
    body = {
        "username": "ada@example.com",
        "signature": sdk.signature("ada@example.com"),
        "password": password_digest("s3cret"),
        "extra": 1,
    }
    assert sdk.send("POST", f"{AUTH}/login", body).status == 400
    plain = HttpRequest(
        "POST", f"{AUTH}/login", {"content-type": "text/plain"}, b'{"username":"a"}'
    )
    assert service.handle(plain).status == 415
    bad = HttpRequest("POST", f"{AUTH}/login", {"content-type": "application/json"}, b"{")
    assert service.handle(bad).status == 400


def test_refresh_rotates_and_the_old_token_dies(sdk: Sdk, service: AuthService) -> None:
    first = refresh_of(sdk.login("ada@example.com", "s3cret"))
    second = sdk.refresh(first)
    assert second.status == 200
    assert refresh_of(second) != first
    assert sdk.refresh(first).status == 401
    assert service.inspect_refresh(first)["state"] == "replaced"
    assert service.inspect_refresh(refresh_of(second))["state"] == "current"
    assert sdk.refresh(refresh_of(second)).status == 200


def test_refresh_grace_lets_a_lost_answer_be_replayed_once(clock: Clock) -> None:
    config = ServiceConfig(account="shop", environment="prod", api_key=KEY, refresh_grace=5)
    sdk = Sdk(AuthService(config, {"ada@example.com": "s3cret"}, clock=clock))
    first = refresh_of(sdk.login("ada@example.com", "s3cret"))
    lost = refresh_of(sdk.refresh(first))
    replay = sdk.refresh(first)
    assert replay.status == 200
    assert sdk.refresh(lost).status == 401  # the successor nobody saw is void
    clock.t += 6
    newest = refresh_of(replay)
    assert sdk.refresh(refresh_of(sdk.refresh(newest))).status == 200
    assert sdk.refresh(newest).status == 401  # replaced long ago, grace over


def test_refresh_token_expires_with_the_session(sdk: Sdk, clock: Clock) -> None:
    token = refresh_of(sdk.login("ada@example.com", "s3cret"))
    clock.t += 30 * 60 + 1
    assert sdk.refresh(token).status == 401


def test_refresh_slides_the_session(sdk: Sdk, clock: Clock) -> None:
    token = refresh_of(sdk.login("ada@example.com", "s3cret"))
    for _ in range(5):
        clock.t += 20 * 60
        response = sdk.refresh(token)
        assert response.status == 200
        token = refresh_of(response)


def test_logout_ends_the_session(sdk: Sdk) -> None:
    token = refresh_of(sdk.login("ada@example.com", "s3cret"))
    assert sdk.send("GET", f"{AUTH}/logout", **{"x-auth-refresh-token": token}).status == 200
    assert sdk.refresh(token).status == 401
    assert sdk.send("GET", f"{AUTH}/logout", **{"x-auth-refresh-token": token}).status == 401


def test_password_change_invalidates_every_old_token(sdk: Sdk) -> None:
    one = refresh_of(sdk.login("ada@example.com", "s3cret"))
    other = refresh_of(sdk.login("ada@example.com", "s3cret"))
    body = {
        "username": "ada@example.com",
        "signature": sdk.signature("ada@example.com"),
        "password": password_digest("s3cret"),
        "newPassword": password_digest("n3w"),
    }
    response = sdk.send("POST", f"{AUTH}/password", body, **{"x-auth-refresh-token": one})
    assert response.status == 200
    assert sdk.refresh(one).status == 401
    assert sdk.refresh(other).status == 401
    assert sdk.refresh(refresh_of(response)).status == 200
    assert sdk.login("ada@example.com", "s3cret").status == 401
    assert sdk.login("ada@example.com", "n3w").status == 200


def test_password_change_needs_the_current_password(sdk: Sdk) -> None:
    token = refresh_of(sdk.login("ada@example.com", "s3cret"))
    body = {
        "username": "ada@example.com",
        "signature": sdk.signature("ada@example.com"),
        "password": password_digest("wrong"),
        "newPassword": password_digest("n3w"),
    }
    assert (
        sdk.send("POST", f"{AUTH}/password", body, **{"x-auth-refresh-token": token}).status == 401
    )
    assert sdk.refresh(token).status == 200


def _register(sdk: Sdk, username: str) -> HttpResponse:
    body = {
        "username": username,
        "signature": sdk.signature(username),
        "password": password_digest("pw"),
    }
    return sdk.send("POST", f"{AUTH}/register", body)


def _commit(sdk: Sdk, bearer: str, key: str = KEY, customer_type: str = "PERSON") -> HttpResponse:
    body = {
        "operationName": "UserCreate",
        "variables": {
            "user": {"newsletter": False, "customerType": customer_type},
            "channelId": "1|se",
            "languageId": "sv-SE",
            "marketId": "se",
        },
        "query": "mutation UserCreate($user: UserInputType!) { updateUser(user: $user) { email } }",
    }
    return sdk.send(
        "POST",
        "/graphql",
        body,
        **{"x-apikey": key, "authorization": f"Bearer {bearer}", "accept": "application/json"},
    )


def test_register_then_commit(sdk: Sdk, service: AuthService) -> None:
    response = _register(sdk, "new@example.com")
    assert response.status == 200
    assert not service.user_committed("new@example.com")
    bearer = body_of(response)["token"]
    assert _commit(sdk, bearer, key="wrong").status == 401
    assert _commit(sdk, "not-a-jwt").status == 401
    assert _commit(sdk, bearer, customer_type="ALIEN").status == 400
    committed = _commit(sdk, bearer, customer_type="ORGANIZATION")
    assert committed.status == 200
    assert body_of(committed) == {"data": {"updateUser": {"email": "new@example.com"}}}
    assert service.user_committed("new@example.com")


def test_register_refuses_a_taken_username(sdk: Sdk) -> None:
    assert _register(sdk, "ada@example.com").status == 409


def test_commit_refuses_an_expired_or_ended_session(sdk: Sdk, clock: Clock) -> None:
    response = _register(sdk, "late@example.com")
    bearer = body_of(response)["token"]
    sdk.send("GET", f"{AUTH}/logout", **{"x-auth-refresh-token": refresh_of(response)})
    assert _commit(sdk, bearer).status == 401
    fresh = body_of(sdk.login("ada@example.com", "s3cret"))["token"]
    clock.t += 901
    assert _commit(sdk, fresh).status == 401


def test_revoke_user_ends_every_session(sdk: Sdk, service: AuthService) -> None:
    token = refresh_of(sdk.login("ada@example.com", "s3cret"))
    assert service.revoke_user("ada@example.com") == 1
    assert sdk.refresh(token).status == 401
    assert service.inspect_refresh(token)["state"] == "revoked"


def test_sessions_of_counts_live_sessions_and_rotations(sdk: Sdk, service: AuthService) -> None:
    first = refresh_of(sdk.login("ada@example.com", "s3cret"))
    sdk.login("ada@example.com", "s3cret")
    second = refresh_of(sdk.refresh(first))
    sdk.refresh(second)
    sdk.refresh(first)  # spent: refused, and no rotation
    sdk.send(
        "GET",
        f"{AUTH}/logout",
        **{"x-auth-refresh-token": refresh_of(sdk.login("ada@example.com", "s3cret"))},
    )
    # Three refresh requests, one of them refused: every request counts, only the two
    # that rotated count as rotations (tests/fleet compares the two).
    assert service.sessions_of("ada@example.com") == {
        "live": 2,
        "rotations": 2,
        "all_rotations": 2,
        "refresh_requests": 3,
    }
    assert service.sessions_of("nobody@example.com") == {
        "live": 0,
        "rotations": 0,
        "all_rotations": 2,
        "refresh_requests": 3,
    }


def test_unknown_paths_and_methods(sdk: Sdk, service: AuthService) -> None:
    assert sdk.send("GET", "/nope").status == 404
    assert sdk.send("DELETE", f"{AUTH}/login").status == 405
    assert sdk.send("GET", "/api/other_prod/login").status == 404
    assert service.counts["GET /login"] == 0


# -- the Merchant API's user operations ------------------------------------------------------


def _user_op(sdk: Sdk, bearer: str, body: dict[str, Any], key: str = KEY) -> HttpResponse:
    headers = {"x-apikey": key, "accept": "application/json"}
    if bearer:
        headers["authorization"] = f"Bearer {bearer}"
    return sdk.send("POST", "/graphql", body, **headers)


def test_user_get_update_and_orders(sdk: Sdk, service: AuthService) -> None:
    bearer = body_of(sdk.login("ada@example.com", "s3cret"))["token"]
    anonymous = _user_op(sdk, bearer, {"query": "{ getUser { email } }"})
    assert anonymous.status == 200
    user = body_of(anonymous)["data"]["getUser"]
    assert user["email"] == "ada@example.com"
    assert user["firstName"] is None
    update = {
        "operationName": "UserUpdate",
        "query": "mutation UserUpdate($user: UserInputType!) { updateUser(user: $user) { id } }",
        "variables": {"user": {"firstName": "Ada", "customerType": "ORGANIZATION"}},
    }
    updated = body_of(_user_op(sdk, bearer, update))["data"]["updateUser"]
    assert (updated["firstName"], updated["customerType"]) == ("Ada", "ORGANIZATION")
    named = {"operationName": "UserGet", "query": "query UserGet { getUser { firstName } }"}
    assert body_of(_user_op(sdk, bearer, named))["data"]["getUser"]["firstName"] == "Ada"
    orders = {"operationName": "UserOrders", "query": "query UserOrders { getOrders { id } }"}
    assert body_of(_user_op(sdk, bearer, orders)) == {"data": {"getOrders": []}}
    service.add_orders("ada@example.com", 2)
    assert [o["id"] for o in body_of(_user_op(sdk, bearer, orders))["data"]["getOrders"]] == [1, 2]
    assert service.counts["graphql UserGet"] == 2
    assert service.counts["graphql UserOrders"] == 2


def test_user_operations_refuse_bad_keys_bearers_and_input(
    sdk: Sdk, service: AuthService, clock: Clock
) -> None:
    login = sdk.login("ada@example.com", "s3cret")
    bearer = body_of(login)["token"]
    query = {"query": "{ getUser { email } }"}
    assert _user_op(sdk, bearer, query, key="wrong").status == 401
    assert _user_op(sdk, "", query).status == 401
    assert _user_op(sdk, bearer, {"query": "{ getProducts { id } }"}).status == 400
    bad = {"operationName": "UserUpdate", "query": "mutation { updateUser }"}
    assert _user_op(sdk, bearer, {**bad, "variables": {"user": {"password": "x"}}}).status == 400
    clock.t += 901
    assert _user_op(sdk, bearer, query).status == 401  # expired
    fresh = body_of(sdk.refresh(dict(login.headers)["x-auth-refresh-token"]))["token"]
    assert _user_op(sdk, fresh, query).status == 200
    service.revoke_user("ada@example.com")
    assert _user_op(sdk, fresh, query).status == 401  # revoked
