"""The Geins auth service and signature service, as a pure request -> response model.

Strict the way the real service is: a signature comes only from the sign path for the
right API key, binds one outstanding challenge, is good once and for a short time; the
password digest must match; refresh tokens rotate and the old one stops working;
logout and password change end the session; register refuses a taken username; the
Merchant API commit needs the API key and a live bearer. It accepts exactly what the
official SDK sends and answers 4xx, with a short JSON reason, to anything else.

No sockets and no sleeping here: the HTTP shell (server.py) feeds requests in, and time
comes from the injected wall clock, so tests drive hours of expiry instantly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import unquote_plus

from broker.emulator.model import jwt, merchant
from broker.emulator.model.values import (
    HttpRequest,
    HttpResponse,
    Refused,
    User,
    json_body,
    json_response,
    refusal,
)
from broker.geins.protocol import (
    API_KEY_HEADER,
    GRAPHQL_PATH,
    REFRESH_HEADER,
    auth_path,
    password_digest,
    sign_path,
)

#: How long a challenge (the `sign`) and a signature stay usable.
SIGNATURE_TTL = 60.0
#: Replaced refresh tokens remembered for `inspect` and the optional reuse grace.
REPLACED_MEMORY = 200_000


@dataclass(slots=True)
class Family:
    """One login's chain of refresh tokens. Revoking it ends the session."""

    family_id: str
    username: str
    lifetime: float
    current: str
    revoked: bool = False
    rotations: int = 0


@dataclass(slots=True)
class RefreshRecord:
    family: str
    expires_at: float
    used: bool = False


@dataclass(slots=True)
class Replaced:
    family: str
    at: float
    successor: str


#: A Merchant API request carrying this header (a test's) is answered only if its
#: bearer is this user's; otherwise 409, counted as `graphql user_mismatch`.
EXPECT_USER_HEADER: Final = "x-emulator-expect-user"
DEMO_USER: Final = "demo@example.com"
DEMO_PASSWORD: Final = "demo-password"  # noqa: S105 - the emulator's public demo account


@dataclass(slots=True)
class ServiceConfig:
    """The emulated service's settings. These defaults are the only ones: the CLI and
    `Emulator` pass on only what they were given."""

    account: str = "demo"
    environment: str = "prod"
    api_key: str = field(default="demo-api-key", repr=False)
    token_ttl: float = 900.0
    refresh_ttl: float = 7 * 24 * 3600.0
    #: Seconds a just-replaced refresh token still works if its successor is unused.
    #: 0 (the default) is strict rotation: the old token dies at once.
    refresh_grace: float = 0.0
    issuer: str = "https://auth-service.geins.io"


class AuthService:
    """Geins' auth service and signature service, as a pure function of requests.

    Over the house's ~300 lines, on purpose: it is one service's behaviour (challenges,
    signatures, refresh-token families with their reuse rule, users, revocation),
    strict the way the real one is, and each handler reads the same state; the values
    are in `values`, the Merchant API's operations in `merchant`, the JWTs in `jwt`.
    """

    def __init__(
        self,
        config: ServiceConfig,
        users: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self._clock = clock
        self._jwt_key = secrets.token_bytes(32)
        self._sign_key = secrets.token_bytes(32)
        self._users: dict[str, User] = {}
        self._challenges: dict[str, tuple[str, float]] = {}
        self._families: dict[str, Family] = {}
        self._refresh: dict[str, RefreshRecord] = {}
        self._replaced: dict[str, Replaced] = {}
        self.counts: Counter[str] = Counter()
        #: The last requests, as received, for tests that check what a client sent.
        self.recent: deque[HttpRequest] = deque(maxlen=64)
        self._auth_prefix = auth_path(config.account, config.environment)
        self._sign_prefix = sign_path(config.api_key)
        for username, password in (users or {}).items():
            self.add_user(username, password)

    # -- control (tests, benchmarks) ---------------------------------------------------------

    def add_user(self, username: str, password: str) -> None:
        self._users[username] = User(str(len(self._users) + 1000), password_digest(password))

    def revoke_user(self, username: str) -> int:
        """End every session of the user, as an administrator would. Returns how many."""
        revoked = 0
        for family in self._families.values():
            if family.username == username and not family.revoked:
                family.revoked = True
                revoked += 1
        return revoked

    def inspect_refresh(self, token: str) -> dict[str, Any]:
        """What the service thinks of a refresh token: current, replaced, revoked, ..."""
        now = self._clock()
        if (record := self._refresh.get(token)) is not None:
            family = self._families[record.family]
            state = (
                "revoked"
                if family.revoked
                else "expired"
                if now >= record.expires_at
                else "current"
            )
            return {"state": state, "rotations": family.rotations}
        if (old := self._replaced.get(token)) is not None:
            return {"state": "replaced", "replaced_at": old.at}
        return {"state": "unknown"}

    def mint_sessions(self, username: str, count: int) -> list[dict[str, Any]]:
        """Sessions as a login would make them, without the signature dance: for
        benchmarks that need thousands of logged-in profiles."""
        if username not in self._users:
            raise KeyError(username)
        sessions = []
        for _ in range(count):
            response = self._grant(username, self.config.refresh_ttl)
            sessions.append(
                {
                    "token": json.loads(response.body)["token"],
                    "refresh_token": dict(response.headers)[REFRESH_HEADER],
                    "max_age": int(self.config.refresh_ttl),
                }
            )
        return sessions

    def user_committed(self, username: str) -> bool:
        return self._users[username].committed

    def live_sessions(self, username: str) -> int:
        return sum(1 for f in self._families.values() if f.username == username and not f.revoked)

    def sessions_of(self, username: str) -> dict[str, int]:
        """A user's sessions as Geins sees them: how many are live, and how many times
        their refresh tokens rotated (all of the user's sessions, and all users'): a
        client's refresh count is checked against these, one refresh per rotation."""
        mine = [f for f in self._families.values() if f.username == username]
        return {
            "live": sum(1 for f in mine if not f.revoked),
            "rotations": sum(f.rotations for f in mine),
            "all_rotations": sum(f.rotations for f in self._families.values()),
            # In the same answer, so the two can be compared with refreshes under way.
            "refresh_requests": self.counts.get("GET /login", 0),
        }

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        route = self._route(request.method, path)
        self.counts[route] += 1
        self.recent.append(request)
        try:
            return self._dispatch(route, request)
        except Refused as refused:
            return refusal(refused.status, refused.reason)

    def _route(self, method: str, path: str) -> str:
        if path.startswith(self._auth_prefix + "/"):
            return f"{method} {path[len(self._auth_prefix) :]}"
        if path.startswith("/auth/sign/"):
            return f"{method} /auth/sign"
        if path == GRAPHQL_PATH:
            return f"{method} /graphql"
        return f"{method} (unknown)"

    def _dispatch(self, route: str, request: HttpRequest) -> HttpResponse:
        handlers: dict[str, Callable[[HttpRequest], HttpResponse]] = {
            "POST /login": self._login_post,
            "GET /login": self._refresh_get,
            "POST /password": self._password,
            "POST /register": self._register,
            "GET /logout": self._logout,
            "GET /auth/sign": self._sign,
            "POST /graphql": self._graphql,
        }
        handler = handlers.get(route)
        if handler is None:
            known_paths = {r.split(" ", 1)[1] for r in handlers}
            if route.split(" ", 1)[1] in known_paths:
                raise Refused(405, "method not allowed")
            raise Refused(404, "no such path")
        return handler(request)

    # -- the signature service ------------------------------------------------------------

    def _sign(self, request: HttpRequest) -> HttpResponse:
        if request.path != self._sign_prefix:
            raise Refused(401, "unknown merchant API key")
        query = request.query
        if not query.startswith("identity=") or "&" in query:
            raise Refused(400, "expected ?identity=<challenge>")
        # Query strings decode `+` as a space, as the real service's framework does: a
        # client that does not escape the challenge like encodeURIComponent gets a
        # signature for the wrong identity, which the auth service then refuses.
        identity = unquote_plus(query[len("identity=") :])
        timestamp = datetime.fromtimestamp(self._clock(), UTC).isoformat(timespec="milliseconds")
        signature = self._signature_of(identity, timestamp)
        return json_response(
            200, {"identity": identity, "signature": signature, "timestamp": timestamp}
        )

    def _signature_of(self, identity: str, timestamp: str) -> str:
        mac = hmac.new(self._sign_key, f"{identity}|{timestamp}".encode(), hashlib.sha256)
        return base64.b64encode(mac.digest()).decode()

    # -- the auth service -----------------------------------------------------------------

    def _login_post(self, request: HttpRequest) -> HttpResponse:
        body = json_body(request)
        if set(body) == {"username"}:
            return self._challenge(_text(body, "username"))
        _only_fields(body, {"username", "signature", "password", "sessionLifetime"})
        username = self._consume_signature(body)
        digest = _digest_field(body, "password")
        user = self._users.get(username)
        if user is None or not hmac.compare_digest(user.digest, digest):
            raise Refused(401, "invalid username or password")
        return self._grant(username, self._session_lifetime(body))

    def _challenge(self, username: str) -> HttpResponse:
        now = self._clock()
        self._challenges = {s: c for s, c in self._challenges.items() if c[1] > now}
        # Standard base64 of random bytes: it carries + / = often enough to catch a
        # client that does not escape the challenge like encodeURIComponent.
        sign = base64.b64encode(secrets.token_bytes(33) + b"\xfb\xff").decode()
        self._challenges[sign] = (username, now + SIGNATURE_TTL)
        return json_response(200, {"sign": sign})

    def _consume_signature(self, body: Mapping[str, Any]) -> str:
        username = _text(body, "username")
        signed = body.get("signature")
        if not isinstance(signed, dict) or set(signed) != {"identity", "signature", "timestamp"}:
            raise Refused(400, "signature must be {identity, signature, timestamp}")
        identity, signature, timestamp = (
            _text(signed, "identity"),
            _text(signed, "signature"),
            _text(signed, "timestamp"),
        )
        expected = self._signature_of(identity, timestamp)
        if not hmac.compare_digest(expected, signature):
            raise Refused(401, "signature was not issued by the signature service")
        try:
            signed_at = datetime.fromisoformat(timestamp).timestamp()
        except ValueError:
            raise Refused(400, "signature timestamp is not ISO 8601") from None
        now = self._clock()
        challenge = self._challenges.pop(identity, None)
        if challenge is None:
            raise Refused(401, "signature is for an unknown or already used challenge")
        if challenge[0] != username or now - signed_at > SIGNATURE_TTL or now > challenge[1]:
            raise Refused(401, "signature expired or was issued for another username")
        return username

    def _session_lifetime(self, body: Mapping[str, Any]) -> float:
        minutes = body.get("sessionLifetime")
        if minutes is None:
            return self.config.refresh_ttl
        if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes <= 0:
            raise Refused(400, "sessionLifetime must be a positive number of minutes")
        return minutes * 60.0

    def _refresh_get(self, request: HttpRequest) -> HttpResponse:
        token = _refresh_header(request)
        return self._rotate(self._take_refresh(token), token)

    def _take_refresh(self, token: str) -> Family:
        """The live family of a presented refresh token, which is spent by presenting it."""
        now = self._clock()
        record = self._refresh.get(token)
        if record is None:
            replaced = self._replaced.get(token)
            grace = self.config.refresh_grace
            if replaced is not None and grace > 0 and now - replaced.at <= grace:
                successor = self._refresh.get(replaced.successor)
                if successor is not None and not successor.used:
                    # The client lost the answer that carried the successor: let the
                    # old token rotate once more, and void the successor it never saw.
                    del self._refresh[replaced.successor]
                    return self._live_family(replaced.family)
            raise Refused(401, "refresh token is not valid")
        family = self._live_family(record.family)
        if now >= record.expires_at:
            del self._refresh[token]
            raise Refused(401, "refresh token expired")
        record.used = True
        return family

    def _live_family(self, family_id: str) -> Family:
        family = self._families[family_id]
        if family.revoked:
            raise Refused(401, "session was ended")
        return family

    def _password(self, request: HttpRequest) -> HttpResponse:
        family = self._family_of(_refresh_header(request))
        body = json_body(request)
        _only_fields(body, {"username", "signature", "password", "newPassword", "sessionLifetime"})
        username = self._consume_signature(body)
        current, new = _digest_field(body, "password"), _digest_field(body, "newPassword")
        user = self._users.get(username)
        if user is None or family.username != username:
            raise Refused(401, "refresh token does not belong to this user")
        if not hmac.compare_digest(user.digest, current):
            raise Refused(401, "invalid username or password")
        user.digest = new
        self.revoke_user(username)
        return self._grant(username, family.lifetime)

    def _family_of(self, token: str) -> Family:
        record = self._refresh.get(token)
        if record is None or self._clock() >= record.expires_at:
            raise Refused(401, "refresh token is not valid")
        return self._live_family(record.family)

    def _register(self, request: HttpRequest) -> HttpResponse:
        body = json_body(request)
        _only_fields(body, {"username", "signature", "password", "sessionLifetime"})
        username = self._consume_signature(body)
        digest = _digest_field(body, "password")
        if username in self._users:
            raise Refused(409, "username is already registered")
        self._users[username] = User(str(len(self._users) + 1000), digest, committed=False)
        return self._grant(username, self._session_lifetime(body))

    def _logout(self, request: HttpRequest) -> HttpResponse:
        self._family_of(_refresh_header(request)).revoked = True
        return HttpResponse(200)

    # -- the Merchant API's user operations ------------------------------------------------

    def _graphql(self, request: HttpRequest) -> HttpResponse:
        if request.headers.get(API_KEY_HEADER) != self.config.api_key:
            raise Refused(401, "missing or wrong x-apikey")
        username = self._bearer_user(request.headers.get("authorization", ""))
        expected = request.headers.get(EXPECT_USER_HEADER)
        if expected is not None:
            # A test's check that the bearer is the customer it sent the request for.
            if expected != username:
                self.counts["graphql user_mismatch"] += 1
                raise Refused(409, "the bearer belongs to another user than expected")
            self.counts["graphql user_checked"] += 1
        body = json_body(request)
        operation = merchant.operation(body)
        self.counts[f"graphql {operation}"] += 1
        return merchant.answer(operation, username, self._users[username], body)

    def add_orders(self, username: str, count: int, note_size: int = 0) -> int:
        """Give the user `count` orders (with a `note` of `note_size` bytes each, to make
        large answers); returns how many they have."""
        return merchant.add_orders(self._users[username], count, note_size)

    def _bearer_user(self, authorization: str) -> str:
        scheme, _, token = authorization.partition(" ")
        claims = jwt.verify(token, self._jwt_key) if scheme == "Bearer" else None
        if claims is None or self._clock() >= claims.get("exp", 0):
            raise Refused(401, "missing, foreign or expired bearer token")
        family = self._families.get(str(claims.get("jti", "")).split(".")[0])
        if family is None or family.revoked:
            raise Refused(401, "bearer token belongs to an ended session")
        return family.username

    # -- issuing tokens -------------------------------------------------------------------

    def _grant(self, username: str, lifetime: float) -> HttpResponse:
        family_id = secrets.token_hex(8)
        refresh = self._new_refresh(family_id, lifetime)
        family = self._families[family_id] = Family(family_id, username, lifetime, refresh)
        return self._tokens(family, refresh)

    def _rotate(self, family: Family, presented: str) -> HttpResponse:
        family_id = family.family_id
        new = self._new_refresh(family_id, family.lifetime)
        # `current` differs from `presented` only on a grace replay: it is the successor
        # the client never saw, which dies unrecorded (it gets no grace of its own).
        self._refresh.pop(family.current, None)
        self._refresh.pop(presented, None)
        earlier = self._replaced.pop(presented, None)
        at = earlier.at if earlier is not None else self._clock()
        self._replaced[presented] = Replaced(family_id, at, new)
        if len(self._replaced) > REPLACED_MEMORY:
            del self._replaced[next(iter(self._replaced))]
        family.current = new
        family.rotations += 1
        return self._tokens(family, new)

    def _new_refresh(self, family_id: str, lifetime: float) -> str:
        token = secrets.token_urlsafe(32)
        self._refresh[token] = RefreshRecord(family_id, self._clock() + lifetime)
        return token

    def _tokens(self, family: Family, refresh: str) -> HttpResponse:
        now = self._clock()
        user = self._users[family.username]
        claims = jwt.geins_claims(
            user_id=user.user_id,
            username=family.username,
            customer_type=user.customer_type,
            issued_at=int(now),
            expires_at=int(now + self.config.token_ttl),
            token_id=f"{family.family_id}.{family.rotations}",
            issuer=self.config.issuer,
            audience=self.config.account,
        )
        body = {"token": jwt.mint(claims, self._jwt_key), "maxAge": int(family.lifetime)}
        return json_response(200, body, ((REFRESH_HEADER, refresh),))


# -- request validation helpers --------------------------------------------------------------


def _only_fields(body: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise Refused(400, f"unexpected fields: {', '.join(sorted(unknown))}")


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise Refused(400, f"{name} must be a non-empty string")
    return value


def _digest_field(body: Mapping[str, Any], name: str) -> str:
    value = _text(body, name)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != hashlib.sha384().digest_size:
        raise Refused(400, f"{name} must be base64(SHA-384(password + salt))")
    return value


def _refresh_header(request: HttpRequest) -> str:
    token = request.headers.get(REFRESH_HEADER)
    if not token:
        raise Refused(401, f"missing {REFRESH_HEADER} header")
    return token
