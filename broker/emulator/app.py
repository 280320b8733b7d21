"""The emulator as one object: the pure model served over HTTP on a loopback port."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER, AuthService, ServiceConfig
from broker.emulator.shell import EmulatorServer
from broker.geins.protocol import Endpoint


class Emulator:
    def __init__(
        self,
        *,
        users: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        port: int = 0,
        **settings: Any,
    ) -> None:
        """`settings` are `ServiceConfig` fields (account, token_ttl, ...); the rest keep
        ServiceConfig's defaults. `users` defaults to the demo user."""
        self.service = AuthService(
            ServiceConfig(**settings),
            {DEMO_USER: DEMO_PASSWORD} if users is None else users,
            clock=clock,
        )
        self.server = EmulatorServer(self.service, host, port)

    @property
    def url(self) -> str:
        return self.server.url

    async def start(self, nursery: trio.Nursery) -> str:
        """Serve in `nursery`; returns the base URL once connections are accepted."""
        url: str = await nursery.start(self.server.serve)
        return url

    def endpoint(self, **overrides: str) -> Endpoint:
        config = self.service.config
        return Endpoint(
            account=overrides.get("account", config.account),
            api_key=overrides.get("api_key", config.api_key),
            environment=overrides.get("environment", config.environment),
            auth_service_url=self.url,
            merchant_api_url=self.url,
            channel_id="1|se",
            language_id="sv-SE",
            market_id="se",
        )


__all__ = ["DEMO_PASSWORD", "DEMO_USER", "Emulator"]
