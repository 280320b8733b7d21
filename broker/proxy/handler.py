"""The proxy's handler: one request in, the profile's credentials on, Geins' answer out.

For each request: pick the profile (the listener's, or the Geins-Broker-Profile
header), check the peer may read it (the token op's ACL), read the body (buffered up
to 1 MiB so it can be sent twice; a larger one streams through), take a bearer with
at least `MIN_VALID` seconds left, forward, and stream the answer back as it comes.

Renewal is invisible: a 401 from Geins for a buffered request makes the profile
rotate once (`Profile.renew_rejected`, single flight) and the request is sent again,
byte for byte, x-idempotency-key included. A streamed body cannot be replayed, so its
401 goes to the caller as it is.

Nothing here logs a header value or a body: the access line has method, path (no
query string), status, duration, profile and uid.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import trio

from broker.core.clock import WallClock
from broker.core.errors import BrokerFault
from broker.core.stats import status_class
from broker.daemon.config import ProxyConfig
from broker.http.server import BadHttp, Exchange, HungUp
from broker.observe import routes as observability
from broker.observe.log import events
from broker.observe.metrics import Metrics
from broker.observe.routes import Observable
from broker.policy.headers import (
    PROFILE_HEADER,
    RETRY_BODY_LIMIT,
    ProxyRefusal,
    downstream_headers,
    error_body,
    is_field_value,
    min_valid_for,
    refusal_for,
    upstream_headers,
)
from broker.proxy.upstream import Pool, Response, UpstreamFailed, UpstreamTimedOut
from broker.rpc.ops import Api
from broker.rpc.peercred import Peer
from broker.sessions.profile import Profile

log = events("broker.proxy")


class ProxyApp:
    def __init__(
        self,
        api: Api,
        config: ProxyConfig,
        wall: WallClock,
        *,
        observable: Observable | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.api = api
        self.config = config
        self.wall = wall
        #: One keep-alive pool per profile (and upstream URL), made on first use.
        self._pools: dict[tuple[str, str], Pool] = {}
        #: What answers GET /metrics and GET /healthz (the daemon); None: no such routes.
        self._observable = observable
        metrics = metrics or Metrics.detached()
        self._requests = metrics.counter(
            "proxy_requests",
            "Proxied requests by status class (499: the caller left).",
            "status_class",
        )
        self._duration = metrics.histogram(
            "proxy_request_duration_seconds",
            "Time from a proxied request to the end of its answer.",
            "status_class",
        )
        #: Per profile: the bearer and API key last sent, as bytes, and whether both
        #: passed `is_field_value` (a bearer changes once per rotation, not per request).
        self._credentials: dict[str, _Credentials] = {}

    @property
    def profiles(self) -> Mapping[str, Profile]:
        return self.api.profiles

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()

    def _pool(self, profile: Profile) -> Pool:
        url = profile.config.endpoint.merchant_api_url
        key = (profile.name, url)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(
                url,
                max_connections=self.config.max_connections,
                timeout=self.config.upstream_timeout,
            )
        return pool

    # -- one request -----------------------------------------------------------------------

    async def handle(self, exchange: Exchange) -> None:
        started = trio.current_time()
        peer: Peer | None = exchange.peer
        name = exchange.header(PROFILE_HEADER) or self.config.profile
        status = 0
        proxied = True
        try:
            if self._observable is not None and observability.routed(exchange.target):
                proxied = False
                status = await self._observe(exchange, peer)
            else:
                status = await self._proxy(exchange, peer, name)
        except ProxyRefusal as refusal:
            status = refusal.status
            await self._refuse(exchange, refusal)
        except BadHttp as bad:
            status = bad.status
            raise
        except HungUp:
            status = 499  # the client went away
            raise
        finally:
            elapsed = trio.current_time() - started
            if proxied:
                kind = status_class(status)
                self._requests.inc(kind)
                self._duration.observe(elapsed, kind)
            log.info(
                "request",
                method=exchange.method,
                path=exchange.path,
                status=status,
                ms=round(elapsed * 1000, 1),
                profile=name,
                uid=None if peer is None else peer.uid,
            )

    async def _observe(self, exchange: Exchange, peer: Peer | None) -> int:
        """GET /metrics or GET /healthz, for root, the daemon's user and `[metrics]`
        allow_users/allow_groups (the profiles' names and states are in both)."""
        if peer is None or not self.api.may_scrape(peer):
            raise ProxyRefusal(403, "forbidden", "this user may not read the metrics")
        assert self._observable is not None
        answered = await observability.answer(self._observable, exchange.method, exchange.target)
        assert answered is not None
        await exchange.respond(*answered)
        return answered[0]

    async def _refuse(self, exchange: Exchange, refusal: ProxyRefusal) -> None:
        if exchange.started:
            return  # too late for an answer: the connection is hung up instead
        headers, body = error_body(refusal.status, refusal.code, str(refusal))
        await exchange.respond(refusal.status, headers, body)

    async def _proxy(self, exchange: Exchange, peer: Peer | None, name: str) -> int:
        if not exchange.target.startswith("/"):
            raise ProxyRefusal(400, "bad_request", "the target must be a path, like /graphql")
        profile = self._readable(peer, name)
        body, rest = await _buffer(exchange)
        bearer = await self._bearer(profile)
        response = await self._send(exchange, profile, bearer, body, rest)
        if response.status == 401 and rest is None:
            await response.aclose()
            log.info("upstream_refused_bearer", profile=profile.name)
            reader = peer is None or not self.api.is_admin(peer)
            await profile.renew_rejected(bearer, reader=reader)
            bearer = await self._bearer(profile)
            response = await self._send(exchange, profile, bearer, body, None)
        return await _relay(exchange, response)

    def _readable(self, peer: Peer | None, name: str) -> Profile:
        if peer is None:
            raise ProxyRefusal(403, "forbidden", "the broker cannot tell which user is calling")
        try:
            return self.api.readable_profile(peer, name)
        except BrokerFault as fault:
            raise refusal_for(fault.code, str(fault)) from None

    async def _bearer(self, profile: Profile) -> str:
        session = profile.session
        tokens = session.tokens
        min_valid = min_valid_for(tokens.lifetime) if tokens is not None else 0.0
        try:
            if not session.serves(self.wall.now(), min_valid):
                await profile.ensure_token(min_valid)
        except BrokerFault as fault:
            raise refusal_for(fault.code, str(fault)) from None
        tokens = session.tokens
        assert tokens is not None
        return tokens.bearer.reveal()

    def _credentials_of(self, profile: Profile, bearer: str) -> _Credentials:
        api_key = profile.config.endpoint.api_key
        known = self._credentials.get(profile.name)
        if known is None or known.bearer != bearer or known.api_key != api_key:
            known = self._credentials[profile.name] = _Credentials(bearer, api_key)
        return known

    async def _send(
        self,
        exchange: Exchange,
        profile: Profile,
        bearer: str,
        body: bytes,
        rest: _StreamedBody | None,
    ) -> Response:
        credentials = self._credentials_of(profile, bearer)
        headers = upstream_headers(
            exchange.raw_headers,
            bearer=credentials.bearer_value,
            api_key=credentials.api_key_value,
            keep_length=rest is not None,
        )
        # The client's headers were validated by h11 as they were parsed; what the
        # proxy adds was checked by is_field_value, so h11 need not check them again.
        parsed = credentials.checked
        content: bytes | AsyncIterator[bytes] = body if rest is None else rest
        # The target is origin-form (checked in _proxy) and is appended to the
        # upstream's base path, never resolved: no target can name another host.
        pool = self._pool(profile)
        pool.timeout = self.config.upstream_timeout
        try:
            return await pool.request(
                exchange.method, exchange.target, headers, content, parsed=parsed
            )
        except UpstreamTimedOut:
            raise ProxyRefusal(504, "timeout", "Geins did not answer in time") from None
        except UpstreamFailed as exc:
            raise ProxyRefusal(502, "upstream_unavailable", f"Geins unreachable: {exc}") from None


class _Credentials:
    __slots__ = ("api_key", "api_key_value", "bearer", "bearer_value", "checked")

    def __init__(self, bearer: str, api_key: str) -> None:
        self.bearer = bearer
        self.api_key = api_key
        self.bearer_value = bearer.encode()
        self.api_key_value = api_key.encode()
        self.checked = is_field_value(self.bearer_value) and is_field_value(self.api_key_value)

    def __repr__(self) -> str:
        return "_Credentials(<redacted>)"


async def _buffer(exchange: Exchange) -> tuple[bytes, _StreamedBody | None]:
    """The body, whole if it is at most RETRY_BODY_LIMIT; else the part read so far and
    the body to stream (that part first, then the rest as it arrives)."""
    parts: list[bytes] = []
    size = 0
    while size <= RETRY_BODY_LIMIT:
        chunk = await exchange.next_chunk()
        if chunk is None:
            return b"".join(parts), None
        parts.append(chunk)
        size += len(chunk)
    return b"", _StreamedBody(b"".join(parts), exchange)


class _StreamedBody:
    """A request body the upstream pulls as it sends: what was read, then the rest.

    A class rather than an async generator: a generator abandoned half-way (Geins
    refused early, the caller hung up) would be left to the garbage collector."""

    def __init__(self, first: bytes, exchange: Exchange) -> None:
        self._first: bytes | None = first
        self._exchange = exchange

    def __aiter__(self) -> _StreamedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        chunk = await self._exchange.next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


async def _relay(exchange: Exchange, response: Response) -> int:
    """Stream Geins' answer to the client, chunk by chunk, never whole in memory."""
    try:
        # Geins' headers as h11 parsed them, less hop-by-hop ones: not validated again.
        await exchange.start(response.status, downstream_headers(response.headers), parsed=True)
        while (chunk := await response.next_chunk()) is not None:
            await exchange.send(chunk)
        await exchange.end()
    except UpstreamFailed as exc:
        # Geins broke off mid-answer: the head is out, so hanging up is the only way to
        # tell the client its answer is incomplete.
        log.warning("upstream_broke_off", reason=str(exc))
    finally:
        await response.aclose()
    return response.status
