"""geins-broker's Python client: fresh Geins bearer tokens from the local broker daemon.

    from geins_broker_client import Client
    with Client() as broker:
        token = broker.token(min_valid=60)

Only msgpack is needed. `TokenCache`, `TrioClient`, `AsyncioClient` and `BrokerAuth`
(httpx) are imported on first use, so a blocking caller never loads trio, asyncio or
httpx, and a one-shot caller (`geins-broker token`) starts fast.
"""

from __future__ import annotations

from ._sync.client import Client
from .errors import (
    BrokerError,
    BrokerNotRunning,
    Forbidden,
    InternalError,
    InvalidCredentials,
    LoginRequired,
    NotLoggedIn,
    ProtocolError,
    RateLimited,
    Unavailable,
    UnknownApp,
    UnknownProfile,
    UnknownSession,
    UntrustedSocket,
    UpstreamError,
)
from .paths import find_socket
from .results import (
    AppStatus,
    CustomerSession,
    Hello,
    ListedSession,
    ProfileStatus,
    Session,
    SessionInfo,
    SessionToken,
    Status,
    Token,
    User,
    WatchEvent,
)

TYPE_CHECKING = False  # typing itself is not imported: start-up time, see calls.py
if TYPE_CHECKING:
    from typing import Any

    from .asyncio_client import AsyncioClient
    from .cache import AsyncTokenCache, TokenCache
    from .httpx_auth import BrokerAuth, SessionAuth
    from .trio_client import TrioClient

__version__ = "0.1.0"

_LAZY = {
    "TokenCache": ".cache",
    "AsyncTokenCache": ".cache",
    "TrioClient": ".trio_client",
    "AsyncioClient": ".asyncio_client",
    "BrokerAuth": ".httpx_auth",
    "SessionAuth": ".httpx_auth",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AppStatus",
    "AsyncTokenCache",
    "AsyncioClient",
    "BrokerAuth",
    "BrokerError",
    "BrokerNotRunning",
    "Client",
    "CustomerSession",
    "Forbidden",
    "Hello",
    "InternalError",
    "InvalidCredentials",
    "ListedSession",
    "LoginRequired",
    "NotLoggedIn",
    "ProfileStatus",
    "ProtocolError",
    "RateLimited",
    "Session",
    "SessionAuth",
    "SessionInfo",
    "SessionToken",
    "Status",
    "Token",
    "TokenCache",
    "TrioClient",
    "Unavailable",
    "UnknownApp",
    "UnknownProfile",
    "UnknownSession",
    "UntrustedSocket",
    "UpstreamError",
    "User",
    "WatchEvent",
    "find_socket",
]
