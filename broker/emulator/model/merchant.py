"""The Merchant API's user operations that need a bearer, as pure functions of a user's
record: UserCreate (the register commit), UserGet, UserUpdate and UserOrders.

Known by operationName, or by the field the query asks for (`{ getUser { email } }` has
no name). No GraphQL parser: the answer carries the whole object, whatever the
selection. The caller (model.AuthService) has checked the API key and the bearer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from broker.emulator.model.values import HttpResponse, Refused, User, json_response
from broker.geins.protocol import CUSTOMER_TYPES

#: The user fields UserUpdate accepts (a subset of the Merchant API's UserInputType).
USER_FIELDS: Final = frozenset(
    {"firstName", "lastName", "phone", "mobilePhone", "newsletter", "customerType"}
)
#: Operation name -> the field its query asks for.
OPERATIONS: Final = {
    "UserGet": "getUser",
    "UserOrders": "getOrders",
    "UserUpdate": "updateUser",
    "UserCreate": "updateUser",
}


def answer(operation: str, username: str, user: User, body: Mapping[str, Any]) -> HttpResponse:
    variables = body.get("variables") or {}
    if not isinstance(variables, dict):
        raise Refused(400, "variables must be an object")
    if operation == "UserGet":
        return _data("getUser", user_view(username, user))
    if operation == "UserOrders":
        return _data("getOrders", list(user.orders))
    if not isinstance(variables.get("user"), dict):
        raise Refused(400, "variables.user is required")
    user_input = variables["user"]
    customer_type = user_input.get("customerType", user.customer_type)
    if customer_type not in CUSTOMER_TYPES:
        raise Refused(400, f"customerType must be one of {', '.join(CUSTOMER_TYPES)}")
    for name in ("channelId", "languageId", "marketId"):
        if not isinstance(variables.get(name), str | None):
            raise Refused(400, f"{name} must be a string")
    if operation == "UserCreate":
        user.customer_type = customer_type
        user.committed = True
        return _data("updateUser", {"email": username})
    unknown = set(user_input) - USER_FIELDS
    if unknown:
        raise Refused(400, f"unknown user fields: {', '.join(sorted(unknown))}")
    user.customer_type = customer_type
    user.details.update({k: v for k, v in user_input.items() if k != "customerType"})
    return _data("updateUser", user_view(username, user))


def user_view(username: str, user: User) -> dict[str, Any]:
    return {
        "id": int(user.user_id),
        "email": username,
        "customerType": user.customer_type,
        **{name: user.details.get(name) for name in sorted(USER_FIELDS - {"customerType"})},
    }


def add_orders(user: User, count: int, note_size: int = 0) -> int:
    for _ in range(count):
        number = len(user.orders) + 1
        user.orders.append(
            {"id": number, "status": "completed", "total": 100 + number, "note": "x" * note_size}
        )
    return len(user.orders)


def operation(body: Mapping[str, Any]) -> str:
    query = body.get("query")
    if not isinstance(query, str):
        raise Refused(400, "query must be a string")
    name = body.get("operationName")
    if name is None:
        # An anonymous query: known by its field (`{ getUser { email } }`).
        for operation, wanted in OPERATIONS.items():
            if wanted in query and operation != "UserCreate":
                return operation
        raise Refused(400, f"the emulator's Merchant API knows only {', '.join(OPERATIONS)}")
    if name not in OPERATIONS:
        raise Refused(400, f"the emulator's Merchant API knows only {', '.join(OPERATIONS)}")
    if OPERATIONS[name] not in query:
        raise Refused(400, f"{name} must ask for {OPERATIONS[name]}")
    return str(name)


def _data(field_name: str, value: Any) -> HttpResponse:
    return json_response(200, {"data": {field_name: value}})
