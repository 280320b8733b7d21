"""`GET /metrics` and `GET /healthz`, for whichever HTTP shell serves them.

The daemon's HTTP listener (the Merchant API proxy's h11-on-trio shell) asks `answer`
first for every request; None means the path is not one of these two, and the request
goes on to the proxy. The answer is plain values (status, headers, body), so the shell
turns it into its own response in a line (`await exchange.respond(*answered)`), and this
module stays free of h11. The shell adds Content-Length, as it does for every answer.
"""

from __future__ import annotations

from typing import Final, Protocol

from broker.observe.metrics import CONTENT_TYPE
from geins_broker_client.health import Health

METRICS_PATH: Final = "/metrics"
HEALTHZ_PATH: Final = "/healthz"
_TEXT: Final = "text/plain; charset=utf-8"
_ALLOWED: Final = ("GET", "HEAD")

Headers = list[tuple[str, str]]


class Observable(Protocol):
    """What the routes need of the daemon (broker/daemon/telemetry.py's `Telemetry`)."""

    async def render_metrics(self) -> bytes: ...
    def health(self) -> Health: ...


def routed(target: str) -> bool:
    """Whether `target` is one of ours (the shell then asks `answer`)."""
    return target.split("?", 1)[0] in (METRICS_PATH, HEALTHZ_PATH)


async def answer(daemon: Observable, method: str, target: str) -> tuple[int, Headers, bytes] | None:
    """The response to `method target` if it is ours, else None.

    `target` is the request target as sent (a query string is ignored). HEAD gets the
    headers of GET and no body. Neither answer may be cached: each is the state now.
    """
    path = target.split("?", 1)[0]
    if path not in (METRICS_PATH, HEALTHZ_PATH):
        return None
    if method not in _ALLOWED:
        body = f"{path} answers GET and HEAD only\n".encode()
        return 405, _headers(_TEXT, allow=", ".join(_ALLOWED)), body
    if path == METRICS_PATH:
        status, content_type, body = 200, CONTENT_TYPE, await daemon.render_metrics()
    else:
        health = daemon.health()
        status, content_type, body = health.http_status, _TEXT, (health.line() + "\n").encode()
    return status, _headers(content_type), b"" if method == "HEAD" else body


def _headers(content_type: str, allow: str | None = None) -> Headers:
    headers = [("Content-Type", content_type), ("Cache-Control", "no-store")]
    if allow is not None:
        headers.append(("Allow", allow))
    return headers


__all__ = ["HEALTHZ_PATH", "METRICS_PATH", "Observable", "answer", "routed"]
