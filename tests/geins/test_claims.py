from __future__ import annotations

import base64
import json

import pytest

from broker.geins import claims


def _jwt(payload: object, *, raw_payload: str | None = None) -> str:
    body = (
        raw_payload or base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    )
    return f"eyJhbGciOiJIUzI1NiJ9.{body}.c2ln"


NS = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/"


def test_namespaced_claims_are_shortened_like_the_sdk() -> None:
    token = _jwt(
        {
            NS + "sid": "42",
            NS + "name": "ada@example.com",
            "http://schemas.geins.io/identity/claims/CustomerType": "organization",
            "MemberType": "Gold",
            "memberId": 7,
            "memberDiscount": 12.5,
            "exp": 1800000900,
            "iat": 1800000000,
        }
    )
    decoded = claims.decode(token)
    assert decoded == claims.Claims(
        exp=1800000900,
        iat=1800000000,
        user_id="42",
        username="ada@example.com",
        customer_type="ORGANIZATION",
        member_type="Gold",
        member_id="7",
        member_discount="12.5",
        expired=False,
    )


def test_sdk_defaults_for_missing_claims() -> None:
    decoded = claims.decode(_jwt({"exp": 5}))
    assert (decoded.user_id, decoded.username, decoded.customer_type) == ("", "unknown", "UNKNOWN")
    assert (decoded.member_type, decoded.member_id, decoded.member_discount) == (
        "unknown",
        "0",
        "0",
    )
    assert decoded.iat is None


def test_expired_claim_marks_the_token() -> None:
    assert claims.decode(_jwt({"exp": 5, "expired": True})).expired


def test_list_values_keep_the_last_element_like_the_sdk() -> None:
    assert claims.payload(_jwt({"role": ["a", "b"]}))["role"] == "b"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a..c",
        "a.b.c.d",
        _jwt(None, raw_payload="!!!"),
        _jwt([1, 2]),
        _jwt({"sub": "x"}),
        _jwt({"exp": "soon"}),
    ],
)
def test_not_a_jwt(token: str) -> None:
    with pytest.raises(claims.NotAJwt) as info:
        claims.decode(token)
    # The message describes the problem without repeating the token.
    assert token == "" or token not in str(info.value)


@pytest.mark.parametrize("exp", ["1e999", "nan", "-inf"])
def test_non_finite_exp_is_not_a_jwt(exp: str) -> None:
    token = _jwt(
        None,
        raw_payload=base64.urlsafe_b64encode(f'{{"exp": {exp}}}'.encode()).rstrip(b"=").decode(),
    )
    with pytest.raises(claims.NotAJwt):
        claims.decode(token)
