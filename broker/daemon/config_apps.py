"""`[apps.NAME]`: one storefront whose customers log in at run time (docs/sessions.md):
the Geins keys as a profile has them (`config_profiles`), who may use the app, its
lifetime policy and limits, and the proxy's session cookie.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.core.tables import ConfigError, TableReader
from broker.customers.model.app import AppSettings
from broker.customers.model.lifetime import Lifetime
from broker.customers.model.ratelimit import LoginRates, Rate
from broker.daemon.config_profiles import endpoint, named_table, policy
from broker.daemon.config_values import DAY, allowed_gids, allowed_uids
from broker.geins.protocol import REQUEST_TIMEOUT
from broker.policy.headers import is_cookie_name


@dataclass(frozen=True, slots=True)
class AppConfig:
    """`[apps.NAME]`: one storefront whose customers log in at run time
    (docs/sessions.md). `settings` is what the customer-session manager runs on; who
    may create, use and end its sessions is the server's check."""

    settings: AppSettings
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    request_timeout: float = REQUEST_TIMEOUT
    #: The cookie the proxy reads a handle from (and never forwards); None: the
    #: Geins-Broker-Session header only (docs/proxy.md).
    proxy_cookie: str | None = None

    @property
    def name(self) -> str:
        return self.settings.name


def parse_app(source: Path, name: str, table: Any) -> AppConfig:
    """`[apps.NAME]`, with the defaults of model/lifetime.py and model/ratelimit.py."""
    r = named_table(source, "apps", name, table)
    life, rates = Lifetime(), LoginRates()
    try:
        lifetime = Lifetime(
            idle_remembered=r.seconds("idle_remembered", life.idle_remembered, most=400 * DAY),
            idle_short=r.seconds("idle_short", life.idle_short, most=30 * DAY),
            max_sessions=r.count("max_sessions", life.max_sessions),
            max_per_customer=r.count("max_per_customer", life.max_per_customer),
            active_for=r.seconds("active_for", life.active_for, most=DAY),
        )
        login_rates = LoginRates(
            per_username=_rate(r, "username", rates.per_username),
            per_uid=_rate(r, "uid", rates.per_uid),
        )
    except ValueError as exc:  # the models' own checks, should one be stricter than these
        raise ConfigError(f"{source}: apps.{name}: {exc}") from None
    defaults = AppSettings(name, endpoint(r))
    app = AppConfig(
        settings=AppSettings(
            name=name,
            endpoint=defaults.endpoint,
            lifetime=lifetime,
            policy=policy(r),
            rates=login_rates,
            max_refreshes=r.count("max_refreshes", defaults.max_refreshes),
            max_purges=r.count("max_purges", defaults.max_purges),
        ),
        allow_uids=allowed_uids(r),
        allow_gids=allowed_gids(r),
        request_timeout=r.seconds("request_timeout", REQUEST_TIMEOUT, most=300.0),
        proxy_cookie=_cookie_name(r),
    )
    r.check_unknown()
    return app


def _cookie_name(r: TableReader) -> str | None:
    name: str | None = r.get("proxy_cookie", str)
    if name is not None and (not is_cookie_name(name) or len(name) > 256):
        raise r.error("proxy_cookie", "must be a cookie name (letters, digits, !#$%&'*+-.^_`|~)")
    return name


def _rate(r: TableReader, who: str, default: Rate) -> Rate:
    """`login_burst_per_<who>` attempts at once, then one every `login_interval_per_<who>`
    seconds."""
    return Rate(
        per_second=1 / r.seconds(f"login_interval_per_{who}", 1 / default.per_second, most=DAY),
        burst=r.count(f"login_burst_per_{who}", int(default.burst)),
    )
