"""One storefront app's settings, as the daemon's config will hand them over."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.customers.model.lifetime import Lifetime
from broker.customers.model.ratelimit import LoginRates
from broker.geins.protocol import Endpoint
from broker.policy.session import Policy


@dataclass(frozen=True, slots=True)
class AppSettings:
    name: str
    #: The Geins account, environment, API key, channel, language and market.
    endpoint: Endpoint
    lifetime: Lifetime = field(default_factory=Lifetime)
    policy: Policy = field(default_factory=Policy)
    rates: LoginRates = field(default_factory=LoginRates)
    #: Refreshes in flight at once for this app (proactive and on demand together).
    max_refreshes: int = 32
    #: Logouts at Geins in flight at once when sessions are purged.
    max_purges: int = 8
