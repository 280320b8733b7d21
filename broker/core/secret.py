"""A value that must not be printed: passwords, bearer tokens, refresh tokens.

Wrapping a secret the moment it enters the process makes leaks a type error rather than
a code-review catch: `repr`, `str` and f-strings show a placeholder, and the only way
to the value is the explicit `reveal()` at the one place that sends it.
"""

from __future__ import annotations

import hmac
from typing import Final, final

REDACTED: Final = "<redacted>"


@final
class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds a str")
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not pickled")
