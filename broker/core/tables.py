"""Typed reading of one TOML table, with errors that name the file and the key.

The daemon's configuration and fleet mode's `[cluster]` table both read their values
through `TableReader`, so each validates its own keys without importing the other.
Pure: the reader is handed a table already parsed; it opens nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A mistake in the configuration: one line naming the file, the key and what is
    wrong (the daemon prints it and exits 2, or on SIGHUP keeps what it has)."""


class TableReader:
    """One table of the file: typed access by key, and a record of the keys read, so
    that `check_unknown` can refuse a key nobody asked for (a typo, most often)."""

    def __init__(self, source: Path, table: Mapping[str, Any], prefix: str) -> None:
        self.source, self.table, self.prefix = source, table, prefix
        self.used: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """The value of `key` if it is one of `kind` (a TOML boolean is no number), else
        `default` when absent; the key counts as known either way."""
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {_kind_names(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {_kind_names(kinds)}, got {type(value).__name__}")
        return value

    def text(self, key: str, default: str | None = None) -> str:
        value = self.get(key, str, default)
        if value is None:
            raise self.error(key, "is required")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return str(value)

    def seconds(self, key: str, default: float, *, most: float, zero_ok: bool = False) -> float:
        """A duration: finite, more than 0 (or at least 0 with `zero_ok`), at most `most`.

        TOML has `nan` and `inf` literals; a timeout of either would make every wait on
        it fail or never end, so both are refused here rather than at the first wait."""
        value = float(self.get(key, (int, float), default))
        if not math.isfinite(value):
            raise self.error(key, f"must be a finite number of seconds, not {value}")
        if value < 0 or (value == 0 and not zero_ok) or value > most:
            low = "0" if zero_ok else "more than 0"
            raise self.error(key, f"must be {low} and at most {most:g} seconds, not {value:g}")
        return value

    def count(self, key: str, default: int, *, least: int = 1) -> int:
        value = int(self.get(key, int, default))
        if value < least:
            raise self.error(key, f"must be at least {least}")
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_names(kinds: tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "a string", list: "a list", dict: "a table"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))
