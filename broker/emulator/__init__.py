"""An emulator of the Geins auth service, strict like the real one.

Tests, benchmarks and a new user's first run use it instead of a Geins account:

    emulator = Emulator(users={"demo@example.com": "demo"}, token_ttl=60)
    url = await emulator.start(nursery)
    endpoint = emulator.endpoint()      # a geins.Endpoint pointing both base URLs here
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import trio

from ..geins import Endpoint
from .model import AuthService, ServiceConfig
from .server import EmulatorServer

DEMO_USER = "demo@example.com"
DEMO_PASSWORD = "demo-password"  # noqa: S105 - the emulator's public demo account


class Emulator:
    def __init__(
        self,
        *,
        account: str = "demo",
        environment: str = "prod",
        api_key: str = "demo-api-key",
        users: Mapping[str, str] | None = None,
        token_ttl: float = 900.0,
        refresh_ttl: float = 7 * 24 * 3600.0,
        refresh_grace: float = 0.0,
        clock: Callable[[], float] = time.time,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        config = ServiceConfig(
            account=account,
            environment=environment,
            api_key=api_key,
            token_ttl=token_ttl,
            refresh_ttl=refresh_ttl,
            refresh_grace=refresh_grace,
        )
        self.service = AuthService(
            config, {DEMO_USER: DEMO_PASSWORD} if users is None else users, clock=clock
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
