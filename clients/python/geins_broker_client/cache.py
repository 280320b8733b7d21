"""Keep the current token inside the calling process.

A hot loop that needs a bearer for every request should not pay a socket round trip per
request. The cache answers from memory while the token it holds has at least
`min_valid` seconds left, and only then asks the daemon, passing the same `min_valid`,
so the daemon hands back a token that will last (refreshing first if it must).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ._async.client import AsyncClient
from ._sync.client import Client
from .results import Token

DEFAULT_MIN_VALID = 60.0


class TokenCache:
    """Thread-safe; share one per profile across the threads of a process."""

    def __init__(
        self,
        client: Client | None = None,
        *,
        profile: str | None = None,
        min_valid: float = DEFAULT_MIN_VALID,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client if client is not None else Client()
        self.profile = profile
        self.min_valid = min_valid
        self._clock = clock
        self._token: Token | None = None
        self._lock = threading.Lock()

    def get(self) -> Token:
        token = self._token
        if token is not None and token.expires_at - self._clock() >= self.min_valid:
            return token
        with self._lock:
            token = self._token
            if token is None or token.expires_at - self._clock() < self.min_valid:
                token = self._token = self.client.token(self.profile, min_valid=self.min_valid)
            return token

    def invalidate(self) -> None:
        """Forget the held token, e.g. after the API answered 401 to it."""
        self._token = None


class AsyncTokenCache:
    """The same for one event loop; concurrent callers share the client's one connection."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        profile: str | None = None,
        min_valid: float = DEFAULT_MIN_VALID,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.profile = profile
        self.min_valid = min_valid
        self._clock = clock
        self._token: Token | None = None

    async def get(self) -> Token:
        token = self._token
        if token is None or token.expires_at - self._clock() < self.min_valid:
            token = await self.client.token(self.profile, min_valid=self.min_valid)
            self._token = token
        return token

    def invalidate(self) -> None:
        self._token = None
