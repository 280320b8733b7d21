"""The emulator's values: HTTP requests and answers as the pure model sees them, the
refusal that ends a request, and a user's record."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.geins.protocol import DEFAULT_CUSTOMER_TYPE


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    target: str
    headers: Mapping[str, str]
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def json_response(
    status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()
) -> HttpResponse:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return HttpResponse(status, body, (("Content-Type", "application/json"), *headers))


def refusal(status: int, reason: str) -> HttpResponse:
    return json_response(status, {"error": reason})


class Refused(Exception):
    """Ends a request with a 4xx; raised deep in validation, answered at the top."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class User:
    user_id: str
    digest: str
    customer_type: str = DEFAULT_CUSTOMER_TYPE
    committed: bool = True
    #: What UserUpdate sets (firstName, ...).
    details: dict[str, Any] = field(default_factory=dict)
    orders: list[dict[str, Any]] = field(default_factory=list)


def json_body(request: HttpRequest) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("application/json"):
        raise Refused(415, "Content-Type must be application/json")
    try:
        body = json.loads(request.body)
    except ValueError:
        raise Refused(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "body must be a JSON object")
    return body
