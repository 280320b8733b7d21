"""The proxy's pure rules: headers each way, and errors as GraphQL-shaped answers."""

from __future__ import annotations

import json

from broker.policy.headers import (
    downstream_headers,
    error_body,
    header_lines,
    is_field_value,
    min_valid_for,
    overridden_length,
    take_cookies,
    upstream_headers,
)


def test_upstream_headers_replace_credentials_and_drop_hop_by_hop() -> None:
    client = [
        (b"host", b"geins"),
        (b"authorization", b"Bearer mine"),
        (b"x-apikey", b"mine"),
        (b"connection", b"keep-alive, X-Secret-Hop"),
        (b"x-secret-hop", b"1"),
        (b"keep-alive", b"timeout=5"),
        (b"transfer-encoding", b"chunked"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"expect", b"100-continue"),
        (b"content-length", b"12"),
        (b"geins-broker-profile", b"default"),
        (b"accept", b"application/json"),
        (b"x-request-id", b"r1"),
        (b"x-idempotency-key", b"k1"),
    ]
    out = upstream_headers(client, bearer=b"B", api_key=b"K", keep_length=False)
    assert out == [
        (b"accept", b"application/json"),
        (b"x-request-id", b"r1"),
        (b"x-idempotency-key", b"k1"),
        (b"authorization", b"Bearer B"),
        (b"x-apikey", b"K"),
    ]
    # Streamed as framed: chunked overrides the declared length, which is not sent on.
    streamed = upstream_headers(client, bearer=b"B", api_key=b"K", keep_length=True)
    assert not any(name == b"content-length" for name, _ in streamed)
    unchunked = [(k, v) for k, v in client if k != b"transfer-encoding"]
    streamed = upstream_headers(unchunked, bearer=b"B", api_key=b"K", keep_length=True)
    assert (b"content-length", b"12") in streamed


def test_downstream_headers_keep_the_length_and_drop_hop_by_hop() -> None:
    upstream = [
        (b"content-type", b"application/json"),
        (b"content-length", b"42"),
        (b"connection", b"close, x-internal"),
        (b"x-internal", b"1"),
        (b"proxy-authenticate", b"Basic"),
        (b"x-request-id", b"r1"),
    ]
    assert downstream_headers(upstream) == [
        (b"content-type", b"application/json"),
        (b"content-length", b"42"),
        (b"x-request-id", b"r1"),
    ]


def test_a_length_that_transfer_encoding_overrides_goes_nowhere() -> None:
    """RFC 9112 6.3: with both, the chunks frame the body; the length is a lie."""
    upstream = [
        (b"content-length", b"5"),
        (b"transfer-encoding", b"chunked"),
        (b"x-request-id", b"r1"),
    ]
    assert overridden_length(upstream)
    assert not overridden_length(upstream[1:])
    assert downstream_headers(upstream) == [(b"x-request-id", b"r1")]


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


def test_field_values_the_proxy_makes_are_checked() -> None:
    assert is_field_value(b"Bearer eyJhbGciOi.J9x_-.abc")
    assert is_field_value(b"demo-api-key")
    assert is_field_value(b"")
    for bad in (b"a\r\nx-evil: 1", b"a\nb", b"a\x00b", b" lead", b"trail ", b"caf\xc3\xa9"):
        assert not is_field_value(bad), bad


def test_an_apps_cookie_is_taken_out_and_the_others_pass() -> None:
    names = frozenset({b"__Host-geins", b"taped"})
    client = [
        (b"accept", b"*/*"),
        (b"cookie", b"theme=dark;__Host-geins=HANDLE ;  lang=sv"),
        (b"cookie", b"a=1;b=2"),  # none of ours: byte for byte
        (b"cookie", b'taped="OTHER"'),  # only ours: the header goes
        (b"cookie", b"__Host-geins=SECOND"),
    ]
    out, found = take_cookies(client, names)
    assert out == [
        (b"accept", b"*/*"),
        (b"cookie", b"theme=dark; lang=sv"),
        (b"cookie", b"a=1;b=2"),
    ]
    assert found == {b"__Host-geins": [b"HANDLE", b"SECOND"], b"taped": [b"OTHER"]}
    assert take_cookies([(b"cookie", b"x=1")], names) == ([(b"cookie", b"x=1")], {})


def test_header_lines_end_each_line_and_make_nothing_of_no_headers() -> None:
    assert header_lines([(b"a", b"1"), (b"b", b"x y")]) == b"a: 1\r\nb: x y\r\n"
    # An answer whose every header is dropped: no line at all, so the head's end
    # (the empty line) comes where its writer puts it, not earlier.
    assert header_lines(downstream_headers([(b"connection", b"close")])) == b""


def test_a_second_connection_header_still_names_what_to_drop() -> None:
    """The lone `Connection: keep-alive` is read by lookup; a repeated Connection
    header (the last one plain) is read in full, each way."""
    message = [
        (b"connection", b"x-hop"),
        (b"x-hop", b"secret"),
        (b"connection", b"keep-alive"),
        (b"accept", b"*/*"),
    ]
    assert downstream_headers(message) == [(b"accept", b"*/*")]
    out = upstream_headers(message, bearer=b"B", api_key=b"K", keep_length=False)
    assert out[0] == (b"accept", b"*/*") and len(out) == 3
    assert downstream_headers([(b"connection", b"keep-alive"), (b"a", b"1")]) == [(b"a", b"1")]
