"""The proxy's rules as pure functions: which headers go where, and errors as answers.

Headers (RFC 9110 section 7.6.1): hop-by-hop headers (Connection, the ones it names,
Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) belong to one
connection and are never forwarded, either way. Authorization and x-apikey from the
client are dropped and the profile's own put in their place; Host is the upstream's;
Geins-Broker-Profile is ours; Proxy-Authorization and Expect are for this hop.
Everything else (Accept, Content-Type, x-request-id, x-idempotency-key, ...) passes.

Errors: every failure is an HTTP answer with a GraphQL-shaped JSON body, which GraphQL
clients show as they show the API's own errors:

    {"errors": [{"message": "...", "extensions": {"code": "not_logged_in"}}]}
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Final

from geins_broker_client.protocol import Code

from ..geins.protocol import API_KEY_HEADER

PROFILE_HEADER: Final = "geins-broker-profile"
#: Request bodies up to this size are buffered, so a 401 can be retried with them.
RETRY_BODY_LIMIT: Final = 1024 * 1024
#: The proxy asks for a bearer with at least this long left (or half its lifetime, for
#: tokens that live less than a minute), so none expires on its way to Geins.
MIN_VALID: Final = 30.0

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: Never forwarded to Geins: replaced (authorization, x-apikey), recomputed (host,
#: content-length for a buffered body) or meant for this hop only.
_NOT_UPSTREAM: Final = frozenset(
    {
        "authorization",
        API_KEY_HEADER,
        "host",
        "content-length",
        "expect",
        "proxy-authorization",
        PROFILE_HEADER,
    }
)
_NOT_DOWNSTREAM: Final = frozenset({"proxy-authenticate"})

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


def _connection_named(headers: Iterable[tuple[str, str]]) -> set[str]:
    named: set[str] = set()
    for name, value in headers:
        if name == "connection":
            named.update(part.strip().lower() for part in value.split(","))
    return named


def upstream_headers(
    client: list[tuple[str, str]], *, bearer: str, api_key: str, keep_length: bool
) -> list[tuple[str, str]]:
    """What Geins gets: the client's end-to-end headers, then the profile's credentials.

    `keep_length`: the body is streamed as the client framed it, so its Content-Length
    (if any) still holds; a buffered body's length is the HTTP client's to set."""
    dropped = HOP_BY_HOP | _NOT_UPSTREAM | _connection_named(client)
    out = [(k, v) for k, v in client if k not in dropped]
    if keep_length:
        out += [(k, v) for k, v in client if k == "content-length"]
    out.append(("authorization", f"Bearer {bearer}"))
    out.append((API_KEY_HEADER, api_key))
    return out


def downstream_headers(upstream: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What the client gets back: Geins' end-to-end headers (Content-Length included:
    the body is relayed byte for byte, undecoded)."""
    dropped = HOP_BY_HOP | _NOT_DOWNSTREAM | _connection_named(upstream)
    return [(k, v) for k, v in upstream if k not in dropped]


def min_valid_for(lifetime: float) -> float:
    return min(MIN_VALID, lifetime / 2)
