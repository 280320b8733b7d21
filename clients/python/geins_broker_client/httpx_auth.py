"""httpx Auths that sign each request with a bearer from the broker: a profile's
(`BrokerAuth`) or a customer session's (`SessionAuth`, by its handle).

    auth = BrokerAuth(profile="default")
    client = httpx.Client(auth=auth)
    ...
    auth.close()    # or `await auth.aclose()` after async use

Importing this module imports httpx; the package root does not, so apps that do not use
httpx never load it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator
from typing import TYPE_CHECKING

import httpx

from ._async.client import AsyncClient
from .cache import DEFAULT_MIN_VALID, AsyncTokenCache, TokenCache

if TYPE_CHECKING:
    from ._sync.client import Client


class BrokerAuth(httpx.Auth):
    """Adds `Authorization: Bearer ...` from the broker to every request.

    On a 401 it drops its cached token, asks the daemon again and retries once: that
    helps when the daemon rotated the token meanwhile (the cached one was revoked with
    a password change, say); if the daemon still holds the same token, the retry gets
    the same 401 and it is returned to the caller.
    """

    def __init__(
        self,
        *,
        profile: str | None = None,
        socket_path: str | None = None,
        min_valid: float = DEFAULT_MIN_VALID,
        cache: TokenCache | None = None,
        async_client: AsyncClient | None = None,
    ) -> None:
        from ._sync.client import Client

        self._cache = cache or TokenCache(Client(socket_path), profile=profile, min_valid=min_valid)
        self._profile = profile
        self._socket_path = socket_path
        self._min_valid = min_valid
        self._async_client = async_client
        self._async_cache: AsyncTokenCache | None = None

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._cache.get().authorization
        response = yield request
        if response.status_code == httpx.codes.UNAUTHORIZED:
            self._cache.invalidate()
            request.headers["Authorization"] = self._cache.get().authorization
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        cache = self._async_cache or self._make_async_cache()
        request.headers["Authorization"] = (await cache.get()).authorization
        response = yield request
        if response.status_code == httpx.codes.UNAUTHORIZED:
            cache.invalidate()
            request.headers["Authorization"] = (await cache.get()).authorization
            yield request

    def close(self) -> None:
        """Close the connection the blocking flow opened (if any)."""
        self._cache.client.close()

    async def aclose(self) -> None:
        """Close the connections both flows opened (if any)."""
        self.close()
        if self._async_cache is not None:
            await self._async_cache.client.aclose()

    def _make_async_cache(self) -> AsyncTokenCache:
        client = self._async_client or AsyncClient(self._socket_path)  # the running loop's
        self._async_cache = AsyncTokenCache(
            client, profile=self._profile, min_valid=self._min_valid
        )
        return self._async_cache


class SessionAuth(httpx.Auth):
    """Adds a customer's bearer (`Authorization: Bearer ...`), named by the session's
    handle, to every request: for a storefront's server-side calls on a customer's
    behalf.

    Each request asks the daemon (`session_token`, answered from its memory); on a
    401 it asks once more and retries once, as BrokerAuth does: that helps when the
    daemon rotated the bearer meanwhile. `repr` never shows the handle.

        auth = SessionAuth("shop", handle)
        httpx.get(url, auth=auth)
    """

    def __init__(
        self,
        app: str,
        handle: str,
        *,
        socket_path: str | None = None,
        min_valid: float = DEFAULT_MIN_VALID,
        client: Client | None = None,
        async_client: AsyncClient | None = None,
    ) -> None:
        self.app = app
        self._handle = handle
        self._socket_path = socket_path
        self._min_valid = min_valid
        self._client = client
        self._async_client = async_client

    def __repr__(self) -> str:
        return f"SessionAuth(app={self.app!r})"

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._bearer()
        response = yield request
        if response.status_code == httpx.codes.UNAUTHORIZED:
            request.headers["Authorization"] = self._bearer()
            yield request

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = await self._async_bearer()
        response = yield request
        if response.status_code == httpx.codes.UNAUTHORIZED:
            request.headers["Authorization"] = await self._async_bearer()
            yield request

    def _bearer(self) -> str:
        if self._client is None:
            from ._sync.client import Client

            self._client = Client(self._socket_path)
        token = self._client.session_token(self.app, self._handle, min_valid=self._min_valid)
        return token.authorization

    async def _async_bearer(self) -> str:
        if self._async_client is None:
            self._async_client = AsyncClient(self._socket_path)  # the running loop's
        token = await self._async_client.session_token(
            self.app, self._handle, min_valid=self._min_valid
        )
        return token.authorization

    def close(self) -> None:
        """Close the connection the blocking flow opened (if any)."""
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        """Close the connections both flows opened (if any)."""
        self.close()
        if self._async_client is not None:
            await self._async_client.aclose()
