"""`[profiles.NAME]`: one Geins account the daemon keeps logged in, and what a profile
shares with an app (`config_apps`): the table's name, the Geins endpoint, the refresh
policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from broker.core.tables import ConfigError, TableReader
from broker.daemon.config_values import DAY, allowed_gids, allowed_uids
from broker.geins.protocol import (
    DEFAULT_AUTH_SERVICE_URL,
    DEFAULT_MERCHANT_API_URL,
    REQUEST_TIMEOUT,
    Endpoint,
)
from broker.policy.session import MAX_CLOCK_SKEW, Policy

_PROFILE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOOPBACK: Final = {"127.0.0.1", "::1", "localhost"}


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    name: str
    endpoint: Endpoint
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    policy: Policy = field(default_factory=Policy)
    request_timeout: float = REQUEST_TIMEOUT
    #: Fleet mode: the session lives in the cluster's store, rotated once fleet-wide.
    #: None (not said): as `[cluster] shared` says; resolved to a bool by the parser.
    shared: bool | None = None


def parse_profile(source: Path, name: str, table: Any) -> ProfileConfig:
    r = named_table(source, "profiles", name, table)
    profile = ProfileConfig(
        name=name,
        endpoint=endpoint(r),
        allow_uids=allowed_uids(r),
        allow_gids=allowed_gids(r),
        policy=policy(
            r,
            reader_refresh_interval=r.seconds(
                "reader_refresh_interval", 30.0, most=DAY, zero_ok=True
            ),
        ),
        request_timeout=r.seconds("request_timeout", REQUEST_TIMEOUT, most=300.0),
        shared=r.get("shared", bool),
    )
    r.check_unknown()
    return profile


def named_table(source: Path, kind: str, name: str, table: Any) -> TableReader:
    """The reader of `[KIND.NAME]` (`kind` is "profiles" or "apps"), once the name is one
    that is safe in file names, metric labels and log lines."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {kind}.{name}: expected a table")
    if not _PROFILE_NAME.fullmatch(name):
        raise ConfigError(
            f"{source}: {kind}.{name}: a {kind[:-1]} name is 1-64 letters, digits, '_', '.', '-'"
        )
    return TableReader(source, table, f"{kind}.{name}.")


def endpoint(r: TableReader) -> Endpoint:
    return Endpoint(
        account=r.text("account"),
        api_key=r.text("api_key"),
        environment=r.text("environment", "prod"),
        auth_service_url=_url(r, "auth_service_url", DEFAULT_AUTH_SERVICE_URL),
        merchant_api_url=_url(r, "merchant_api_url", DEFAULT_MERCHANT_API_URL),
        channel_id=r.get("channel_id", str),
        language_id=r.get("language_id", str),
        market_id=r.get("market_id", str),
    )


def policy(r: TableReader, **more: float) -> Policy:
    refresh_at = float(r.get("refresh_at", (int, float), 0.75))
    if not 0.1 <= refresh_at <= 0.9:
        raise r.error("refresh_at", "must be between 0.1 and 0.9 (a share of the token's lifetime)")
    jitter = float(r.get("jitter", (int, float), 0.05))
    if not 0 <= jitter <= 0.2:
        raise r.error("jitter", "must be between 0 and 0.2")
    return Policy(
        refresh_at=refresh_at,
        jitter=jitter,
        max_clock_skew=r.seconds("max_clock_skew", MAX_CLOCK_SKEW, most=30 * DAY),
        **more,
    )


def _url(r: TableReader, key: str, default: str) -> str:
    value = r.text(key, default)
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise r.error(key, f"not an http(s) URL: {value!r}")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise r.error(key, "Geins is spoken to over HTTPS only (http is allowed for loopback)")
    if parts.query or parts.fragment:
        raise r.error(key, "a base URL has no query or fragment")
    return value.rstrip("/")
