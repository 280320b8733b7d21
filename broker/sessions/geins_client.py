"""The Geins auth client: the only module that speaks to Geins.

Every function sends exactly what the official SDK sends (same paths, methods, headers,
bodies, digest and escaping; see protocol.py) and turns every way it can fail into
one of the typed errors in errors.py, once, here: connection trouble and 5xx/429 are
`Transient` (with Retry-After), a dead refresh token is `RefreshTokenRejected`, a wrong
password is `InvalidCredentials`, a 2xx without what the protocol promises is
`MalformedAnswer`. No message built here contains a password, a token or a refresh
token, nor the URLs (the sign URL carries the API key).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any, Final

import httpx
import trio

from broker import __version__
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
from broker.core.stats import UpstreamStats, status_class
from broker.geins.protocol import (
    API_KEY_HEADER,
    DEFAULT_NEW_USER,
    REFRESH_HEADER,
    REQUEST_TIMEOUT,
    SHORT_SESSION_MINUTES,
    USER_CREATE_MUTATION,
    Endpoint,
    Grant,
    encode_uri_component,
    password_digest,
    retry_after_seconds,
)

USER_AGENT = f"geins-broker/{__version__}"
_JSON = {"Content-Type": "application/json"}
#: The largest bearer token accepted (a Geins JWT is about a kilobyte).
MAX_BEARER: Final = 64 * 1024
#: The largest refresh token accepted (Geins' are opaque strings of some dozens of bytes).
MAX_REFRESH_TOKEN: Final = 4 * 1024
#: The most of an answer read: a bearer of 64 KiB in JSON is well under it.
MAX_ANSWER: Final = 1024 * 1024
_FRAMING_HEADERS: Final = frozenset({"content-encoding", "content-length", "transfer-encoding"})
#: The longest session (maxAge) believed: ten years.
MAX_SESSION_SECONDS: Final = 10 * 366 * 86400


class GeinsClient:
    """One profile's conversation with Geins over a shared httpx client.

    The httpx client is shared by every profile (one connection pool, one TLS context);
    this object only adds the profile's endpoint. Every request has `timeout` seconds.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        http: httpx.AsyncClient,
        timeout: float = REQUEST_TIMEOUT,
        *,
        stats: UpstreamStats | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._http = http
        self._timeout = timeout
        self._stats = stats or UpstreamStats()

    # -- the five functions --------------------------------------------------------------

    async def login(self, username: str, password: Secret, *, remember: bool) -> Grant:
        body: dict[str, Any] = {
            "username": username,
            "signature": await self._signature(username),
            "password": password_digest(password.reveal()),
        }
        if not remember:
            body["sessionLifetime"] = SHORT_SESSION_MINUTES
        response = await self._send("POST", self._auth("login"), "login", json_body=body)
        if response.status_code in (401, 403):
            raise InvalidCredentials("Geins refused the username or password")
        return _grant(_checked(response, "login"), "login")

    async def refresh(self, refresh_token: Secret) -> Grant:
        headers = {**_JSON, REFRESH_HEADER: refresh_token.reveal()}
        response = await self._send("GET", self._auth("login"), "refresh", headers=headers)
        if response.status_code in (401, 403):
            raise RefreshTokenRejected("Geins rejected the refresh token; log in again")
        return _grant(_checked(response, "refresh"), "refresh")

    async def change_password(
        self, refresh_token: Secret, username: str, password: Secret, new_password: Secret
    ) -> Grant:
        body = {
            "username": username,
            "signature": await self._signature(username),
            "password": password_digest(password.reveal()),
            "newPassword": password_digest(new_password.reveal()),
        }
        headers = {REFRESH_HEADER: refresh_token.reveal()}
        response = await self._send(
            "POST", self._auth("password"), "password change", json_body=body, headers=headers
        )
        if response.status_code in (401, 403):
            raise InvalidCredentials("Geins refused the current password")
        return _grant(_checked(response, "password change"), "password change")

    async def register(
        self, username: str, password: Secret, user: Mapping[str, Any] | None = None
    ) -> Grant:
        """Create the account, then commit the user to the Merchant API, as the SDK does."""
        grant = await self.create_account(username, password)
        await self.commit_user(grant.bearer, user)
        return grant

    async def create_account(self, username: str, password: Secret) -> Grant:
        """The register call alone; the caller must still `commit_user`."""
        body = {
            "username": username,
            "signature": await self._signature(username),
            "password": password_digest(password.reveal()),
        }
        response = await self._send("POST", self._auth("register"), "register", json_body=body)
        if response.status_code == 409:
            raise InvalidCredentials("that username is already registered")
        return _grant(_checked(response, "register"), "register")

    async def commit_user(self, bearer: Secret, user: Mapping[str, Any] | None = None) -> None:
        endpoint = self.endpoint
        body = {
            "operationName": "UserCreate",
            "variables": {
                "user": dict(user) if user is not None else dict(DEFAULT_NEW_USER),
                "channelId": endpoint.channel_id,
                "languageId": endpoint.language_id,
                "marketId": endpoint.market_id,
            },
            "query": USER_CREATE_MUTATION,
        }
        headers = {
            API_KEY_HEADER: endpoint.api_key,
            "Authorization": f"Bearer {bearer.reveal()}",
            "Accept": "application/json",
        }
        response = await self._send(
            "POST", endpoint.graphql_url, "user commit", json_body=body, headers=headers
        )
        answer = _json_object(_checked(response, "user commit"), "user commit")
        if answer.get("errors") or not isinstance(answer.get("data"), dict):
            raise UpstreamRejected("the Merchant API refused to commit the new user", 200)

    async def logout(self, refresh_token: Secret) -> None:
        headers = {**_JSON, REFRESH_HEADER: refresh_token.reveal()}
        response = await self._send("GET", self._auth("logout"), "logout", headers=headers)
        _checked(response, "logout")

    # -- challenge and signature -----------------------------------------------------------

    async def _signature(self, username: str) -> dict[str, str]:
        """Steps 1 and 2: a challenge from the auth service, signed by the sign service."""
        response = await self._send(
            "POST", self._auth("login"), "challenge", json_body={"username": username}
        )
        sign = _json_object(_checked(response, "challenge"), "challenge").get("sign")
        if not isinstance(sign, str) or not sign:
            raise MalformedAnswer("Geins answered the challenge without a sign")
        url = self.endpoint.sign_base + encode_uri_component(sign)
        response = await self._send("GET", url, "signature", headers=_JSON)
        if response.status_code in (401, 403, 404):
            raise UpstreamRejected("the signature service refused the Merchant API key", 403)
        signature = _json_object(_checked(response, "signature"), "signature")
        if not all(
            isinstance(signature.get(k), str) for k in ("identity", "signature", "timestamp")
        ):
            raise MalformedAnswer(
                "the signature service answered without identity/signature/timestamp"
            )
        return {k: signature[k] for k in ("identity", "signature", "timestamp")}

    # -- transport -------------------------------------------------------------------------

    def _auth(self, action: str) -> str:
        return f"{self.endpoint.auth_base}/{action}"

    async def _send(
        self,
        method: str,
        url: str,
        what: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        content = None
        if json_body is not None:
            all_headers.update(_JSON)
            content = json.dumps(json_body, separators=(",", ":")).encode()
        # The route label is `what` (a fixed set named in this module), never the URL.
        route, outcome = what.replace(" ", "_"), "cancelled"
        started = trio.current_time()
        request = self._http.build_request(
            method, url, content=content, headers=all_headers, timeout=self._timeout
        )
        try:
            response = await self._http.send(request, stream=True)
            outcome = status_class(response.status_code)
            try:
                body = await _bounded_body(response, what)
            finally:
                await response.aclose()
        except httpx.TimeoutException:
            outcome = "timeout"
            raise UpstreamTimeout(
                f"Geins did not answer the {what} within {self._timeout:g} s"
            ) from None
        except httpx.TransportError as exc:
            outcome = "error"
            raise Transient(f"cannot reach Geins for the {what} ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:  # e.g. a body that does not decode as declared
            outcome = "error"
            raise MalformedAnswer(
                f"Geins answered the {what} unreadably ({type(exc).__name__})"
            ) from None
        finally:
            self._stats.record(route, outcome, trio.current_time() - started)
        # The body as read (decoded), under the headers that still describe it.
        kept = [
            (k, v) for k, v in response.headers.multi_items() if k.lower() not in _FRAMING_HEADERS
        ]
        return httpx.Response(response.status_code, headers=kept, content=body)


async def _bounded_body(response: httpx.Response, what: str) -> bytes:
    """At most `MAX_ANSWER` bytes of the body: an upstream (or a proxy in front of it)
    streaming gigabytes is cut off, not held in memory."""
    too_big = MalformedAnswer(f"Geins answered the {what} with more than {MAX_ANSWER} bytes")
    length = response.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > MAX_ANSWER:
        raise too_big
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER:
            raise too_big
    return bytes(body)


def _checked(response: httpx.Response, what: str) -> httpx.Response:
    """The response if 2xx; otherwise the typed error for its status."""
    status = response.status_code
    if 200 <= status < 300:
        return response
    retry_after = retry_after_seconds(response.headers.get("Retry-After"), time.time())
    if status == 429:
        raise Transient(f"Geins is rate limiting the {what} (429)", retry_after)
    if status >= 500:
        raise Transient(f"Geins failed the {what} ({status})", retry_after)
    raise UpstreamRejected(f"Geins refused the {what} ({status})", status)


def _json_object(response: httpx.Response, what: str) -> dict[str, Any]:
    if not response.content:
        raise MalformedAnswer(f"Geins answered the {what} with an empty body")
    try:
        body = json.loads(response.content)
    except ValueError:
        raise MalformedAnswer(f"Geins answered the {what} with a body that is not JSON") from None
    if not isinstance(body, dict):
        raise MalformedAnswer(f"Geins answered the {what} with JSON that is not an object")
    return body


def _grant(response: httpx.Response, what: str) -> Grant:
    """The grant in a 2xx answer.

    Once the header holds a new refresh token, the old one is spent: any later fault
    in the answer is an `UnusableGrant` that carries the new one, so the caller can
    keep the session (a proxy's HTML error page with Geins' header on it, say).
    """
    refresh = response.headers.get(REFRESH_HEADER)
    if not refresh:
        raise MalformedAnswer(f"Geins answered the {what} without a {REFRESH_HEADER} header")
    if len(refresh) > MAX_REFRESH_TOKEN:
        raise MalformedAnswer(
            f"Geins answered the {what} with a refresh token of {len(refresh)} characters "
            f"(at most {MAX_REFRESH_TOKEN} are accepted)"
        )
    new_refresh = Secret(refresh)
    try:
        token, max_age = _grant_body(response, what)
    except MalformedAnswer as exc:
        raise UnusableGrant(str(exc), new_refresh) from None
    return Grant(Secret(token), new_refresh, max_age)


def _grant_body(response: httpx.Response, what: str) -> tuple[str, int | None]:
    body = _json_object(response, what)
    token = body.get("token")
    if not isinstance(token, str) or not token:
        raise MalformedAnswer(f"Geins answered the {what} without a token")
    if len(token) > MAX_BEARER:
        # Every token answer carries it, pre-encoded, to every client: a bearer of
        # megabytes would cost that much per answer, per connection.
        raise MalformedAnswer(
            f"Geins answered the {what} with a bearer token of {len(token)} characters "
            f"(at most {MAX_BEARER} are accepted)"
        )
    max_age = body.get("maxAge")
    if max_age is not None and (
        isinstance(max_age, bool)
        or not isinstance(max_age, int | float)
        or not math.isfinite(max_age)
        or not 0 <= max_age <= MAX_SESSION_SECONDS
    ):
        raise MalformedAnswer(f"Geins answered the {what} with a maxAge that is not a number")
    return token, None if max_age is None else int(max_age)


__all__ = ["GeinsClient"]
