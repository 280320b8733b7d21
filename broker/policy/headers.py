"""The proxy's rules as pure functions: which headers go where, and errors as answers.

Headers are the wire's bytes, names lowercased (as h11 gives them). Headers (RFC 9110
section 7.6.1): hop-by-hop headers (Connection, the ones it names,
Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) belong to one
connection and are never forwarded, either way. Authorization and x-apikey from the
client are dropped and the profile's own put in their place; Host is the upstream's;
Geins-Broker-Profile, Geins-Broker-Session and Geins-Broker-App are ours, and so is
an app's `proxy_cookie` (taken out of the Cookie header, which passes with the rest);
Proxy-Authorization and Expect are for this hop. Everything else (Accept,
Content-Type, x-request-id, x-idempotency-key, ...) passes.

Framing: a message with both Transfer-Encoding and Content-Length is framed by the
Transfer-Encoding alone (RFC 9112 6.3), so its Content-Length is never forwarded,
either way: sent on beside a body re-framed by the next hop, that false length
would make the next parser (ours or Geins') read the message differently. A caller
that sends both gets its answer and then a closed connection (RFC 9112 6.1:
`overridden_length`).

Errors: every failure is an HTTP answer with a GraphQL-shaped JSON body, which GraphQL
clients show as they show the API's own errors:

    {"errors": [{"message": "...", "extensions": {"code": "not_logged_in"}}]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

from broker.geins.protocol import API_KEY_HEADER
from geins_broker_client.protocol import Code

PROFILE_HEADER: Final = "geins-broker-profile"
#: A customer session's handle (docs/sessions.md), and optionally the app it is of.
SESSION_HEADER: Final = "geins-broker-session"
APP_HEADER: Final = "geins-broker-app"
_API_KEY: Final = API_KEY_HEADER.encode("ascii")
#: Request bodies up to this size are buffered, so a 401 can be retried with them.
RETRY_BODY_LIMIT: Final = 1024 * 1024
#: The proxy asks for a bearer with at least this long left (or half its lifetime, for
#: tokens that live less than a minute), so none expires on its way to Geins.
MIN_VALID: Final = 30.0

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
#: Never forwarded to Geins: replaced (authorization, x-apikey), recomputed (host,
#: content-length for a buffered body) or meant for this hop only.
_NOT_UPSTREAM: Final = frozenset(
    {
        b"authorization",
        _API_KEY,
        b"host",
        b"content-length",
        b"expect",
        b"proxy-authorization",
        PROFILE_HEADER.encode("ascii"),
        SESSION_HEADER.encode("ascii"),
        APP_HEADER.encode("ascii"),
    }
)
_NOT_DOWNSTREAM: Final = frozenset({b"proxy-authenticate"})
_NOT_UPSTREAM_HOP: Final = HOP_BY_HOP | _NOT_UPSTREAM
_NOT_DOWNSTREAM_HOP: Final = HOP_BY_HOP | _NOT_DOWNSTREAM
#: A header value as RFC 9110 (5.5) allows it, without obs-text: visible ASCII, inner
#: spaces and tabs. h11 checks every value it sends against (a superset of) this; a
#: value the proxy makes itself is checked here once, so h11 need not check again.
_FIELD_VALUE: Final = re.compile(rb"[\x21-\x7e]([\t\x20-\x7e]*[\x21-\x7e])?|")


def is_field_value(value: bytes) -> bool:
    return _FIELD_VALUE.fullmatch(value) is not None


#: Broker error codes -> HTTP status.
STATUS_OF_CODE: Final = {
    Code.NOT_LOGGED_IN: 401,
    Code.LOGIN_REQUIRED: 401,
    Code.FORBIDDEN: 403,
    Code.UNKNOWN_PROFILE: 404,
    Code.BAD_REQUEST: 400,
    Code.UPSTREAM_UNAVAILABLE: 502,
    Code.UPSTREAM_ERROR: 502,
    Code.INVALID_CREDENTIALS: 502,
    Code.TIMEOUT: 504,
    Code.BUSY: 503,
    Code.UNKNOWN_SESSION: 401,
    Code.UNKNOWN_APP: 404,
}


class ProxyRefusal(Exception):
    """A request the proxy answers itself: `status`, with `code` in the JSON body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def refusal_for(code: str, message: str) -> ProxyRefusal:
    return ProxyRefusal(STATUS_OF_CODE.get(code, 500), code, message)


def error_body(status: int, code: str, message: str) -> tuple[list[tuple[str, str]], bytes]:
    body = {"errors": [{"message": message, "extensions": {"code": code, "status": status}}]}
    data = json.dumps(body, separators=(",", ":")).encode()
    return [("content-type", "application/json"), ("cache-control", "no-store")], data


def overridden_length(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the message carries a Content-Length that its Transfer-Encoding
    overrides (RFC 9112 6.3): a contradiction only a lying or smuggling peer sends."""
    length = coding = False
    for name, _ in headers:
        if name == b"content-length":
            length = True
        elif name == b"transfer-encoding":
            coding = True
    return length and coding


Headers = list[tuple[bytes, bytes]]


def _hop_by_hop(
    headers: Headers, names: dict[bytes, bytes], always: frozenset[bytes]
) -> frozenset[bytes]:
    """The names not to forward: `always`, and those a Connection header names.
    `names`: `dict(headers)`. A lone Connection header naming one of `always` (the
    `Connection: keep-alive` nearly every message carries) costs two lookups."""
    connection = names.get(b"connection")
    if connection is None or (connection.lower() in always and len(names) == len(headers)):
        return always  # no name repeats, so this is the only Connection header
    return always | _connection_named(headers)


def _connection_named(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            named.update(part.strip().lower() for part in value.split(b","))
    return named


def upstream_headers(
    client: Headers, *, bearer: bytes, api_key: bytes, keep_length: bool
) -> Headers:
    """What Geins gets: the client's end-to-end headers, then the profile's credentials.

    `keep_length`: the body is streamed as the client framed it, so its Content-Length
    (if any) still holds, unless a Transfer-Encoding overrides it; a buffered body's
    length is the HTTP client's to set."""
    # The names present, in one pass in C (the few checks below are lookups).
    names = dict(client)
    dropped = _hop_by_hop(client, names, _NOT_UPSTREAM_HOP)
    out = [pair for pair in client if pair[0] not in dropped]
    if keep_length and b"content-length" in names and b"transfer-encoding" not in names:
        out += [pair for pair in client if pair[0] == b"content-length"]
    out.append((b"authorization", b"Bearer " + bearer))
    out.append((_API_KEY, api_key))
    return out


#: A cookie name as RFC 6265 (4.1.1) allows it: an RFC 9110 token.
_COOKIE_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_cookie_name(name: str) -> bool:
    return _COOKIE_NAME.fullmatch(name) is not None


def take_cookies(
    client: Headers, names: frozenset[bytes]
) -> tuple[Headers, dict[bytes, list[bytes]]]:
    """`client` without the cookies named `names`, and those cookies' values (each
    name's, in order: two of one name are for the caller to refuse). Every Cookie
    header is searched (RFC 6265 asks for one; an HTTP/2 hop may split it). A header
    that held none of `names` passes byte for byte; one that did passes with the
    others rejoined by "; ", or not at all when nothing is left."""
    found: dict[bytes, list[bytes]] = {}
    out: Headers = []
    for key, value in client:
        if key != b"cookie":
            out.append((key, value))
            continue
        kept, taken = [], False
        for pair in value.split(b";"):
            name, _, cookie = pair.strip().partition(b"=")
            if name.strip() in names:
                found.setdefault(name.strip(), []).append(cookie.strip().strip(b'"'))
                taken = True
            elif pair.strip():
                kept.append(pair.strip())
        if not taken:
            out.append((key, value))
        elif kept:
            out.append((key, b"; ".join(kept)))
    return out, found


def downstream_headers(upstream: Headers) -> Headers:
    """What the client gets back: Geins' end-to-end headers (Content-Length included:
    the body is relayed byte for byte, undecoded; unless a Transfer-Encoding overrode
    it, and the body is re-framed)."""
    names = dict(upstream)
    dropped = _hop_by_hop(upstream, names, _NOT_DOWNSTREAM_HOP)
    if b"content-length" in names and b"transfer-encoding" in names:
        dropped = dropped | {b"content-length"}
    return [pair for pair in upstream if pair[0] not in dropped]


def header_lines(headers: Headers) -> bytes:
    """`headers` as a head's lines, `name: value` and CRLF each (joined in C: no
    Python step per header)."""
    if not headers:
        return b""
    return b"\r\n".join(map(b": ".join, headers)) + b"\r\n"


def min_valid_for(lifetime: float) -> float:
    return min(MIN_VALID, lifetime / 2)


#: A `.` or `..` path segment, raw or percent-encoded, after `/` or a backslash (which
#: some servers, IIS among them, read as `/`), ending at a separator or the path's end.
_DOT_SEGMENT: Final = re.compile(rb"(?:^|/|\\|%5c)(?:\.|%2e){1,2}(?:/|\\|%2f|%5c|$)", re.IGNORECASE)


def has_dot_segment(target: bytes) -> bool:
    """Whether the path of origin-form `target` has a dot segment: the upstream would
    resolve it, and a target appended to a base path could step out of it."""
    if b"." not in target and b"%" not in target:
        return False  # every dot segment has a dot, raw or encoded
    return _DOT_SEGMENT.search(target.split(b"?", 1)[0]) is not None
