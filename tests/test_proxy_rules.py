"""The proxy's pure rules: headers each way, and errors as GraphQL-shaped answers."""

from __future__ import annotations

import json

from broker.proxy.rules import downstream_headers, error_body, min_valid_for, upstream_headers


def test_upstream_headers_replace_credentials_and_drop_hop_by_hop() -> None:
    client = [
        ("host", "geins"),
        ("authorization", "Bearer mine"),
        ("x-apikey", "mine"),
        ("connection", "keep-alive, X-Secret-Hop"),
        ("x-secret-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("transfer-encoding", "chunked"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
        ("proxy-authorization", "Basic x"),
        ("expect", "100-continue"),
        ("content-length", "12"),
        ("geins-broker-profile", "default"),
        ("accept", "application/json"),
        ("x-request-id", "r1"),
        ("x-idempotency-key", "k1"),
    ]
    out = upstream_headers(client, bearer="B", api_key="K", keep_length=False)
    assert out == [
        ("accept", "application/json"),
        ("x-request-id", "r1"),
        ("x-idempotency-key", "k1"),
        ("authorization", "Bearer B"),
        ("x-apikey", "K"),
    ]
    streamed = upstream_headers(client, bearer="B", api_key="K", keep_length=True)
    assert ("content-length", "12") in streamed


def test_downstream_headers_keep_the_length_and_drop_hop_by_hop() -> None:
    upstream = [
        ("content-type", "application/json"),
        ("content-length", "42"),
        ("connection", "close, x-internal"),
        ("x-internal", "1"),
        ("transfer-encoding", "chunked"),
        ("proxy-authenticate", "Basic"),
        ("x-request-id", "r1"),
    ]
    assert downstream_headers(upstream) == [
        ("content-type", "application/json"),
        ("content-length", "42"),
        ("x-request-id", "r1"),
    ]


def test_errors_are_graphql_shaped() -> None:
    headers, body = error_body(401, "not_logged_in", "profile 'default' is not logged in")
    assert ("content-type", "application/json") in headers
    assert json.loads(body) == {
        "errors": [
            {
                "message": "profile 'default' is not logged in",
                "extensions": {"code": "not_logged_in", "status": 401},
            }
        ]
    }


def test_min_valid_is_30_s_or_half_a_short_lifetime() -> None:
    assert min_valid_for(900) == 30
    assert min_valid_for(20) == 10
