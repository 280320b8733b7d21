"""The proxy's handler: one request in, the profile's credentials on, Geins' answer out.

For each request (`Proxied`, made when its head is parsed): pick the profile (the
listener's, or the Geins-Broker-Profile header) and check the peer may read it (the
token op's ACL), or the customer session a Geins-Broker-Session header or an app's
cookie names (by_handle.py); then take the body (buffered up to 1 MiB so it can be
sent twice; a larger one streams through as it comes), take a bearer with at least
`MIN_VALID` seconds left, forward, and relay Geins' answer as it comes, never whole in memory.

All of that runs on the reactor, without awaiting, while the bearer is in memory (the
common case). What must wait goes to a trio task and comes back: a bearer to refresh
(`Profile.ensure_token`), a 401 to renew (`Profile.renew_rejected`, single flight; a
session's through `CustomerRoute.bearer`), /metrics to render.

Renewal is invisible: a 401 from Geins for a buffered request makes the profile
rotate once and the request is sent again, byte for byte, x-idempotency-key included.
A streamed body cannot be replayed, so its 401 goes to the caller as it is.

Nothing here logs a header value or a body: the access line (accesslog.py) has method,
path (no query string), status, duration, profile (or app and 8 hex digits of the
session id) and uid.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar

import trio

from broker.core.clock import WallClock
from broker.core.errors import BrokerFault
from broker.core.stats import status_class
from broker.customers.model.handles import log_id
from broker.daemon.config_proxy import ProxyConfig
from broker.geins.protocol import Endpoint
from broker.observe import routes as observability
from broker.observe.log import events
from broker.observe.metrics import Metrics
from broker.observe.routes import Observable
from broker.policy.headers import (
    APP_HEADER,
    PROFILE_HEADER,
    RETRY_BODY_LIMIT,
    SESSION_HEADER,
    ProxyRefusal,
    downstream_headers,
    error_body,
    has_dot_segment,
    header_lines,
    is_field_value,
    min_valid_for,
    refusal_for,
    take_cookies,
    upstream_headers,
)
from broker.policy.session import Tokens
from broker.proxy.accesslog import AccessLog
from broker.proxy.by_handle import CustomerRoute
from broker.proxy.client import ClientConnection, Handling, Request, status_line
from broker.proxy.reactor import Reactor
from broker.proxy.upstream import Exchange, Pool, UpstreamFailed, UpstreamTimedOut
from broker.rpc.ops import Api
from broker.rpc.peercred import Peer
from broker.sessions.profile import Profile

log = events("broker.proxy")

_PROFILE: Final = PROFILE_HEADER.encode("ascii")
_SESSION: Final = SESSION_HEADER.encode("ascii")
_APP: Final = APP_HEADER.encode("ascii")
_CHUNKED: Final = b"transfer-encoding: chunked\r\n"
_CLOSE: Final = b"connection: close\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
#: The heads made from headers (a request's header lines for Geins, an answer's head
#: for the caller) are kept by what they were made from (the heads of one client or
#: one upstream repeat byte for byte), while that is at most `_MEMO_HEADERS` header
#: lines of at most `_MEMO_BYTES` in all, in at most `_MEMO_ENTRIES` entries a memo
#: (emptied when full: a peer that varies its headers only costs the making). The
#: count bounds what a key holds as much as the bytes do: each header is a tuple and
#: two bytes objects (~120 bytes) however short, so 2 KiB of one-byte headers would
#: be a 200 KiB key. A head that cannot be kept is not looked up either.
_MEMO_BYTES: Final = 2048
_MEMO_HEADERS: Final = 32
_MEMO_ENTRIES: Final = 64
_K = TypeVar("_K")
_V = TypeVar("_V")
#: Each HTTP status's class, made once (`status_class` per request was measurable).
_STATUS_CLASSES: Final = {status: status_class(status) for status in range(100, 600)}
#: What a target the observability routes answer starts with (`routes.routed` decides).
_OBSERVED: Final = (
    observability.METRICS_PATH.encode("ascii"),
    observability.HEALTHZ_PATH.encode("ascii"),
)


class ProxyApp:
    def __init__(
        self,
        api: Api,
        config: ProxyConfig,
        wall: WallClock,
        reactor: Reactor,
        *,
        observable: Observable | None = None,
        metrics: Metrics | None = None,
        access: AccessLog | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.wall = wall
        self.reactor = reactor
        self.access = access or AccessLog()
        #: One keep-alive pool per profile (and upstream URL), made on first use.
        self._pools: dict[tuple[str, str], Pool] = {}
        #: What answers GET /metrics and GET /healthz (the daemon); None: no such routes.
        self.observable = observable
        metrics = metrics or Metrics.detached()
        self.requests = metrics.counter(
            "proxy_requests",
            "Proxied requests by status class (499: the caller left).",
            "status_class",
        )
        self.duration = metrics.histogram(
            "proxy_request_duration_seconds",
            "Time from a proxied request to the end of its answer.",
            "status_class",
        )
        #: Per profile: the bearer and API key last sent, as header lines.
        self._credentials: dict[str, _Credentials] = {}
        #: Per profile: what a request needs while its bearer is in memory (`_Ready`).
        self.ready: dict[str, _Ready] = {}
        #: The apps' proxy cookies (name -> the apps that read it), for `_apps_seen`.
        self._cookies: dict[bytes, frozenset[str]] = {}
        self._cookie_names: frozenset[bytes] = frozenset()
        self._apps_seen: object = None
        #: Answers' heads for the caller, by what they are made of (`_MEMO_BYTES`).
        self.heads: dict[tuple[Any, ...], tuple[bytes, bool, bool]] = {}
        #: Requests being handled right now.
        self.in_flight = 0
        self._quiet: trio.Event | None = None

    @property
    def profiles(self) -> Mapping[str, Profile]:
        return self.api.profiles

    def begin(self, conn: ClientConnection, request: Request) -> Handling:
        self.in_flight += 1
        return Proxied(self, conn, request)

    def refused(self, status: int, code: str, message: str) -> tuple[list[tuple[str, str]], bytes]:
        return error_body(status, code, message)

    def finished(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._quiet is not None:
            self._quiet.set()

    async def drained(self) -> None:
        """Return once no request is being handled (for a graceful stop)."""
        while self.in_flight:
            self._quiet = self._quiet or trio.Event()
            await self._quiet.wait()
            self._quiet = None

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def cookies(self) -> tuple[frozenset[bytes], dict[bytes, frozenset[str]]]:
        """The apps' `proxy_cookie` names, and which apps read each (rebuilt when a
        reload replaces the apps)."""
        apps = self.api.session_ops.apps
        if apps is not self._apps_seen:
            cookies: dict[bytes, set[str]] = {}
            for name, app in apps.items():
                if app.proxy_cookie is not None:
                    cookies.setdefault(app.proxy_cookie.encode("ascii"), set()).add(name)
            self._cookies = {k: frozenset(v) for k, v in cookies.items()}
            self._cookie_names = frozenset(cookies)
            self._apps_seen = apps
        return self._cookie_names, self._cookies

    def pool(self, owner: str, url: str) -> Pool:
        """The pool for a profile's (or, as "app:NAME", an app's) Merchant API."""
        key = (owner, url)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                self.reactor,
                url,
                max_connections=self.config.max_connections,
                timeout=self.config.upstream_timeout,
            )
        pool.timeout = self.config.upstream_timeout
        return pool

    def credentials(self, profile: Profile, bearer: str) -> _Credentials:
        api_key = profile.config.endpoint.api_key
        known = self._credentials.get(profile.name)
        if known is None or known.bearer != bearer or known.api_key != api_key:
            known = self._credentials[profile.name] = _Credentials(bearer, api_key)
        return known


class _Ready:
    """A profile's request path while its tokens, endpoint and the proxy's settings
    stay the same objects: the bearer, its credentials, the pool, and the wall time
    until which the bearer serves (`Session.serves` with `min_valid_for` its lifetime:
    with a positive `min_valid`, it serves exactly while now <= expires_at - min_valid).
    Spares a request a dozen calls; any change of the three makes a new one."""

    __slots__ = ("bearer", "config", "credentials", "endpoint", "fields", "pool", "tokens", "until")

    def __init__(
        self,
        tokens: Tokens,
        endpoint: Endpoint,
        config: ProxyConfig,
        *,
        bearer: str,
        credentials: _Credentials,
        pool: Pool,
    ) -> None:
        self.tokens = tokens
        self.endpoint = endpoint
        self.config = config
        self.bearer = bearer
        self.credentials = credentials
        self.pool = pool
        self.until = tokens.expires_at - min_valid_for(tokens.lifetime)
        #: A buffered request's header lines for Geins (these credentials on), by the
        #: caller's headers (`_MEMO_BYTES`).
        self.fields: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}

    def __repr__(self) -> str:
        return "_Ready(<redacted>)"


class _Credentials:
    """A profile's bearer and API key as bytes (a bearer changes once per rotation, not
    per request), and whether both may go in a header as they are."""

    __slots__ = ("api_key", "api_key_value", "bearer", "bearer_value", "usable")

    def __init__(self, bearer: str, api_key: str) -> None:
        self.bearer = bearer
        self.api_key = api_key
        self.bearer_value = bearer.encode()
        self.api_key_value = api_key.encode()
        self.usable = is_field_value(self.bearer_value) and is_field_value(self.api_key_value)

    def __repr__(self) -> str:
        return "_Credentials(<redacted>)"


class Proxied:
    """One request, from its head to the end of its answer (module docstring).

    Over the house's ~300 lines and ~15 attributes, on purpose: one request's life is
    one state machine (credentials on, the body buffered or streamed, one renewal and
    retry on a 401, the answer streamed back), run on the reactor with no await in the
    common case; its fields are slots read per callback. The rules are pure
    (`policy.headers`), the session lookup is `by_handle`, the I/O is the connections'.
    """

    __slots__ = (
        "_bearer",
        "_body",
        "_chunked_down",
        "_chunked_up",
        "_close_after",
        "_customer",
        "_done",
        "_exchange",
        "_headers",
        "_profile",
        "_retried",
        "_routed",
        "_size",
        "_streaming",
        "_upstream_ready",
        "app",
        "conn",
        "name",
        "proxied",
        "request",
        "started",
        "status",
    )

    def __init__(self, app: ProxyApp, conn: ClientConnection, request: Request) -> None:
        self.app = app
        self.conn = conn
        self.request = request
        self.started = app.reactor.now
        self.status = 0
        self.proxied = True
        self._done = False
        self._body: list[bytes] = []
        self._size = 0
        self._streaming = False
        self._upstream_ready = False
        self._exchange: Exchange | None = None
        self._profile: Profile | None = None
        self._bearer = ""
        self._retried = False
        self._chunked_up = False
        self._chunked_down = False
        self._close_after = False
        self._customer: CustomerRoute | None = None
        #: Whether a profile or a customer session serves it (its body is wanted).
        self._routed = False
        self._headers = request.headers
        named = request.fields.get(_PROFILE)
        self.name = named.decode("latin-1") if named is not None else app.config.profile
        try:
            self._begin()
        except ProxyRefusal as refusal:
            self._refuse(refusal)

    def _begin(self) -> None:
        app, request = self.app, self.request
        peer: Peer | None = self.conn.peer
        if (
            app.observable is not None
            and request.target.startswith(_OBSERVED)
            and observability.routed(_text(request.target))
        ):
            self.proxied = False
            if peer is None or not app.api.may_scrape(peer):
                raise ProxyRefusal(403, "forbidden", "this user may not read the metrics")
            app.reactor.spawn(self._observe, app.observable)
            return
        if not request.target.startswith(b"/"):
            raise ProxyRefusal(400, "bad_request", "the target must be a path, like /graphql")
        if has_dot_segment(request.target):
            # Resolved by the upstream, it could step out of merchant_api_url's base path.
            raise ProxyRefusal(400, "bad_request", "the target's path has a . or .. segment")
        if peer is None:
            raise ProxyRefusal(403, "forbidden", "the broker cannot tell which user is calling")
        if not self._by_handle(peer):
            try:
                self._profile = app.api.readable_profile(peer, self.name)
            except BrokerFault as fault:
                raise refusal_for(fault.code, str(fault)) from None
        self._routed = True
        expect = request.fields.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not request.complete:
            self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _by_handle(self, peer: Peer) -> bool:
        """Whether the request names a customer session (then its route is set). Takes
        the apps' proxy cookies out of what goes upstream, whatever the request."""
        app, request = self.app, self.request
        fields = request.fields
        if _SESSION not in fields and _APP not in fields and b"cookie" not in fields:
            return False  # the common case, in three lookups
        headers = request.headers
        handle, named_app, profile, cookie = _named(headers)
        cookie_apps = None
        if cookie:
            names, apps = app.cookies()
            if names:
                self._headers, found = take_cookies(headers, names)
                if handle is None and found:
                    # The header wins over a cookie; of two apps' cookies, the first.
                    taken, values = next(iter(found.items()))
                    if len(values) > 1:  # which one is the customer's is not ours to guess
                        raise ProxyRefusal(400, "bad_request", "more than one session cookie")
                    handle, cookie_apps = values[0], apps[taken]
        if handle is None and named_app is None:
            return False
        if handle is None:
            raise ProxyRefusal(400, "bad_request", "Geins-Broker-App without a session")
        if profile:
            raise ProxyRefusal(400, "bad_request", "name a profile or a session, not both")
        route = self._customer = CustomerRoute.choose(
            app.api.session_ops, peer, handle, named_app, cookie_apps
        )
        self.name = route.app
        return True

    # -- the caller's body -----------------------------------------------------------------

    def on_body(self, data: bytes) -> None:
        if self._done or not self._routed:
            return
        if self._streaming:
            self._stream(data)
            return
        self._body.append(data)
        self._size += len(data)
        if self._size > RETRY_BODY_LIMIT:
            # Too large to hold for a retry: stream it, what came so far first.
            self._streaming = True
            self._forward()

    def on_body_end(self) -> None:
        if self._done or not self._routed:
            return
        if not self._streaming:
            self._forward()
            return
        if self._chunked_up:
            self._stream(_LAST_CHUNK, framed=True)
        if self._exchange is not None:
            self._exchange.finish()

    def _stream(self, data: bytes, *, framed: bool = False) -> None:
        if not framed and self._chunked_up:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if not self._upstream_ready or self._exchange is None:
            self._body.append(data)
            self.conn.pause_reading(True)
        elif not self._exchange.send(data):
            self.conn.pause_reading(True)

    def body_sent(self) -> None:
        if self._streaming and not self._done:
            self.conn.pause_reading(False)

    # -- the bearer ------------------------------------------------------------------------

    def _forward(self) -> None:
        """Send the request with a bearer from memory, or fetch one first (a task)."""
        route = self._customer
        if route is not None:
            bearer = route.bearer_now(self.app.wall.now())
            if bearer is not None:
                self._send(bearer)
                return
            if self._streaming:
                self.conn.pause_reading(True)
            self.app.reactor.spawn(self._customer_then_send, None)
            return
        profile = self._profile
        assert profile is not None
        session = profile.session
        tokens = session.tokens
        app = self.app
        ready = app.ready.get(profile.name)
        if (
            ready is not None
            and ready.tokens is tokens
            and ready.endpoint is profile.config.endpoint
            and ready.config is app.config
            and app.wall.now() <= ready.until
        ):
            self._send_on(ready.bearer, ready.credentials, ready.pool, ready.fields)
            return
        min_valid = min_valid_for(tokens.lifetime) if tokens is not None else 0.0
        if tokens is not None and session.serves(app.wall.now(), min_valid):
            bearer = tokens.bearer.reveal()
            if min_valid <= 0:
                self._send(bearer)  # a degenerate lifetime: `until` would not hold
                return
            endpoint = profile.config.endpoint
            ready = app.ready[profile.name] = _Ready(
                tokens,
                endpoint,
                app.config,
                bearer=bearer,
                credentials=app.credentials(profile, bearer),
                pool=app.pool(profile.name, endpoint.merchant_api_url),
            )
            self._send_on(ready.bearer, ready.credentials, ready.pool, ready.fields)
        else:
            if self._streaming:
                self.conn.pause_reading(True)
            self.app.reactor.spawn(self._refresh_then_send, None)

    async def _refresh_then_send(self, rejected: str | None) -> None:
        """The slow path: rotate after a 401 (`rejected` bearer), make sure of a bearer
        with time left, then back to the reactor's way."""
        profile = self._profile
        assert profile is not None
        try:
            if rejected is not None:
                peer = self.conn.peer
                reader = peer is None or not self.app.api.is_admin(peer)
                await profile.renew_rejected(rejected, reader=reader)
            tokens = profile.session.tokens
            min_valid = min_valid_for(tokens.lifetime) if tokens is not None else 0.0
            if tokens is None or not profile.session.serves(self.app.wall.now(), min_valid):
                await profile.ensure_token(min_valid)
        except BrokerFault as fault:
            self.app.reactor.tick()
            if not self._done:
                self._refuse(refusal_for(fault.code, str(fault)))
            return
        except Exception:
            log.exception("internal_error", profile=profile.name)
            self.app.reactor.tick()
            if not self._done:
                self._refuse(ProxyRefusal(500, "internal", "internal error; see the daemon's log"))
            return
        tokens = profile.session.tokens
        self.app.reactor.tick()
        if self._done:
            return
        if tokens is None:
            self._refuse(refusal_for("not_logged_in", f"profile {profile.name!r} is not logged in"))
            return
        self._send(tokens.bearer.reveal())

    async def _customer_then_send(self, rejected: str | None) -> None:
        """The slow path of a session's request (CustomerRoute.bearer), then back to
        the reactor's way."""
        route = self._customer
        assert route is not None
        try:
            bearer = await route.bearer(rejected)
        except BrokerFault as fault:
            self.app.reactor.tick()
            self.name = route.app
            if not self._done:
                self._refuse(refusal_for(fault.code, str(fault)))
            return
        except Exception:
            log.exception("internal_error", app=route.app)
            self.app.reactor.tick()
            if not self._done:
                self._refuse(ProxyRefusal(500, "internal", "internal error; see the daemon's log"))
            return
        self.app.reactor.tick()
        self.name = route.app
        if not self._done:
            self._send(bearer)

    # -- to Geins --------------------------------------------------------------------------

    def _send(self, bearer: str) -> None:
        app = self.app
        route, profile = self._customer, self._profile
        if route is not None:
            self.name = route.app
            endpoint = route.endpoint
            # Built per request: a session's bearer is its own, never cached by app.
            credentials = _Credentials(bearer, endpoint.api_key)
            pool = app.pool("app:" + route.app, endpoint.merchant_api_url)
        else:
            assert profile is not None
            credentials = app.credentials(profile, bearer)
            pool = app.pool(profile.name, profile.config.endpoint.merchant_api_url)
        self._send_on(bearer, credentials, pool)

    def _send_on(
        self,
        bearer: str,
        credentials: _Credentials,
        pool: Pool,
        memo: dict[tuple[tuple[bytes, bytes], ...], bytes] | None = None,
    ) -> None:
        """`memo`: the profile's header lines for Geins already made (`_Ready.fields`)."""
        request = self.request
        if not credentials.usable:
            self._refuse(
                ProxyRefusal(502, "upstream_error", "the credentials cannot go in a header")
            )
            return
        self._bearer = bearer
        body: bytes | None
        if self._streaming:
            headers = upstream_headers(
                self._headers,
                bearer=credentials.bearer_value,
                api_key=credentials.api_key_value,
                keep_length=True,
            )
            fields = header_lines(headers)
            if not any(name == b"content-length" for name, _ in headers):
                fields += _CHUNKED
                if not self._chunked_up:
                    self._chunked_up = True
                    self._body = [b"%x\r\n%s\r\n" % (len(p), p) for p in self._body if p]
            body = None
        else:
            body = b"".join(self._body)
            fields = self._buffered_lines(credentials, memo) + b"content-length: %d\r\n" % len(body)
        # The target is origin-form (checked in _begin) and is appended to the
        # upstream's base path, never resolved: no target can name another host.
        self._exchange = pool.request(
            self, request.method, request.target, fields, body, head_only=request.method == b"HEAD"
        )
        if self._streaming and not self._done:
            self._upstream_ready = True
            pending, self._body = self._body, []
            sent = True
            for piece in pending:
                sent = self._exchange.send(piece)
            if self.request.ended:
                # The body ended while the bearer was being fetched.
                if self._chunked_up:
                    sent = self._exchange.send(_LAST_CHUNK)
                self._exchange.finish()
            self.conn.pause_reading(not sent)

    def _buffered_lines(
        self, credentials: _Credentials, memo: dict[tuple[tuple[bytes, bytes], ...], bytes] | None
    ) -> bytes:
        """A buffered request's header lines for Geins (its length not among them),
        from `memo` when they were made before."""
        request = self.request
        # `head_size` (the target and every header line as received) is at least
        # the lines the key holds.
        if request.head_size > _MEMO_BYTES or len(self._headers) > _MEMO_HEADERS:
            memo = None
        key: tuple[tuple[bytes, bytes], ...] = ()
        made: bytes | None = None
        if memo is not None:
            key = tuple(self._headers)
            made = memo.get(key)
        if made is None:
            made = header_lines(
                upstream_headers(
                    self._headers,
                    bearer=credentials.bearer_value,
                    api_key=credentials.api_key_value,
                    keep_length=False,
                )
            )
            if memo is not None:
                _remember(memo, key, made)
        return made

    # -- Geins' answer ---------------------------------------------------------------------

    def answer_head(self, status: int, headers: list[tuple[bytes, bytes]], framed: bool) -> None:
        if status == 401 and not self._streaming and not self._retried:
            self._retried = True
            exchange, self._exchange = self._exchange, None
            if exchange is not None:
                exchange.cancel()
            route = self._customer
            if route is not None:
                assert route.live is not None
                log.info(
                    "upstream_refused_bearer", app=route.app, session=log_id(route.live.session_id)
                )
                self.app.reactor.spawn(self._customer_then_send, self._bearer)
                return
            log.info("upstream_refused_bearer", profile=self.name)
            self.app.reactor.spawn(self._refresh_then_send, self._bearer)
            return
        self.status = status
        request = self.request
        if len(headers) <= _MEMO_HEADERS and _lines_size(headers) <= _MEMO_BYTES:
            heads = self.app.heads
            key = (status, framed, request.keep_alive, request.version, *headers)
            made = heads.get(key)
            if made is None:
                made = _answer_head(status, headers, framed, request)
                _remember(heads, key, made)
        else:
            made = _answer_head(status, headers, framed, request)
        head, self._chunked_down, self._close_after = made
        self.conn.start(head)

    def answer_body(self, data: bytes) -> None:
        if self._done:
            return
        if self._chunked_down:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if not self.conn.write(data) and self._exchange is not None:
            self._exchange.pause(True)

    def on_writable(self) -> None:
        if self._exchange is not None:
            self._exchange.pause(False)

    def answer_end(self) -> None:
        if self._done:
            return
        self._exchange = None
        if self._chunked_down:
            self.conn.write(_LAST_CHUNK)
        self._finish(self.status)
        self.conn.end(keep_alive=not self._close_after)

    def upstream_failed(self, exc: UpstreamFailed) -> None:
        self._exchange = None
        if self._done:
            return
        if self.conn.started:
            # Geins broke off mid-answer: the head is out, so hanging up is the only
            # way to tell the client its answer is incomplete.
            log.warning("upstream_broke_off", reason=str(exc))
            self._finish(self.status)
            self.conn.hang_up()
        elif isinstance(exc, UpstreamTimedOut):
            self._refuse(ProxyRefusal(504, "timeout", "Geins did not answer in time"))
        else:
            self._refuse(ProxyRefusal(502, "upstream_unavailable", f"Geins unreachable: {exc}"))

    # -- the end ---------------------------------------------------------------------------

    def on_gone(self, status: int) -> None:
        if self._done:
            return
        exchange, self._exchange = self._exchange, None
        if exchange is not None:
            exchange.cancel()
        self._finish(status)

    async def _observe(self, observable: Observable) -> None:
        request = self.request
        method, target = request.method.decode("ascii"), _text(request.target)
        answered = await observability.answer(observable, method, target)
        assert answered is not None
        self.app.reactor.tick()
        if self._done:
            return
        status, headers, body = answered
        self._finish(status)
        self.conn.answer(status, headers, body, head_only=method == "HEAD")

    def _refuse(self, refusal: ProxyRefusal) -> None:
        if self._done:
            return
        if self.conn.started:
            self._finish(refusal.status)
            self.conn.hang_up()
            return
        headers, body = error_body(refusal.status, refusal.code, str(refusal))
        self._finish(refusal.status)
        self.conn.answer(refusal.status, headers, body, head_only=self.request.method == b"HEAD")

    def _finish(self, status: int) -> None:
        """Counted and logged once, however the request ends."""
        if self._done:
            return
        self._done = True
        app = self.app
        app.finished()
        elapsed = app.reactor.now - self.started
        if self.proxied:
            kind = _STATUS_CLASSES.get(status) or status_class(status)
            app.requests.inc(kind)
            app.duration.observe(elapsed, kind)
        peer: Any = self.conn.peer
        route = self._customer
        app.access.record(
            self.request.method,
            self.request.target,
            status,
            elapsed,
            self.name,
            None if peer is None else peer.uid,
            None if route is None else (route.live.session_id if route.live else b""),
        )


def _answer_head(
    status: int, headers: list[tuple[bytes, bytes]], framed: bool, request: Request
) -> tuple[bytes, bool, bool]:
    """The caller's head for Geins' answer, whether its body is re-chunked, and whether
    the connection closes after it."""
    lines = [status_line(status), header_lines(downstream_headers(headers))]
    chunked = close = False
    if not framed:
        if request.version == "1.1":
            chunked = True
            lines.append(_CHUNKED)
        else:
            close = True  # HTTP/1.0: the close ends the body
    if not request.keep_alive or close:
        close = True
        lines.append(_CLOSE)
    lines.append(b"\r\n")
    return b"".join(lines), chunked, close


def _remember(memo: dict[_K, _V], key: _K, made: _V) -> None:
    """Keep `made` under `key`, emptying `memo` first when it is full (`_MEMO_ENTRIES`):
    a peer that varies its headers costs only the making."""
    if len(memo) >= _MEMO_ENTRIES:
        memo.clear()
    memo[key] = made


def _lines_size(headers: list[tuple[bytes, bytes]]) -> int:
    """What `headers` are as header lines ("name: value" and CRLF each), in bytes."""
    return sum(len(name) + len(value) for name, value in headers) + 4 * len(headers)


def _named(headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None, bool, bool]:
    """The Geins-Broker-Session and Geins-Broker-App values, whether the request names a
    profile, and whether it has a Cookie header, in one pass. Two of either of ours
    are refused: which one a hop would take is not ours to guess."""
    handle = named_app = None
    profile = cookie = False
    for name, value in headers:
        if name == _SESSION:
            if handle is not None:
                raise ProxyRefusal(400, "bad_request", "more than one Geins-Broker-Session")
            handle = value
        elif name == _APP:
            if named_app is not None:
                raise ProxyRefusal(400, "bad_request", "more than one Geins-Broker-App")
            named_app = value
        elif name == _PROFILE:
            profile = True
        elif name == b"cookie":
            cookie = True
    return handle, named_app, profile, cookie


def _text(target: bytes) -> str:
    return target.decode("latin-1")
