#!/usr/bin/env python3
"""Generate the blocking client from the async one; `--check` fails when they differ.

    scripts/unasync.py           rewrite clients/python/geins_broker_client/_sync/client.py
    scripts/unasync.py --check   exit 1 (with a diff) if _sync/client.py is not what it would write

The source is _async/client.py (see its docstring for why the client is written this way). Each
line goes through the substitutions below, in order. Every rule
must fire at least once: a rule that no longer matches means the source changed shape,
and the table should be trimmed rather than left to rot.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clients" / "python" / "geins_broker_client"
SOURCE = PACKAGE / "_async" / "client.py"
TARGET = PACKAGE / "_sync" / "client.py"

HEADER = (
    "# Generated from _async/client.py by scripts/unasync.py:"
    " edit that file, then run the script.\n"
)

SUBSTITUTIONS: list[tuple[str, str]] = [
    (
        r"\bfrom \.\._backends\.auto import default_backend\b",
        "from .._backends.sync import default_backend",
    ),
    # AsyncClient, AsyncStream, ... and _AsyncConnection: an underscore may come before.
    (r"(?<![A-Za-z0-9])Async([A-Z]\w*)\b", r"\1"),
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\bawait ", ""),
    (r"\baclose\b", "close"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in SUBSTITUTIONS]


def unasync(source: str) -> tuple[str, set[int]]:
    """The blocking twin of `source`, and the indexes of the rules that fired."""
    used: set[int] = set()
    lines = []
    for line in source.splitlines(keepends=True):
        text = line
        for index, (pattern, replacement) in enumerate(_COMPILED):
            text, count = pattern.subn(replacement, text)
            if count:
                used.add(index)
        lines.append(text)
    return HEADER + "".join(lines), used


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    check = args == ["--check"]
    if args and not check:
        print("usage: scripts/unasync.py [--check]", file=sys.stderr)
        return 2
    expected, used = unasync(SOURCE.read_text())
    if unused := [SUBSTITUTIONS[i] for i in range(len(SUBSTITUTIONS)) if i not in used]:
        print(f"unasync: rules that no longer match {SOURCE.name}: {unused}", file=sys.stderr)
        return 1
    if not check:
        TARGET.write_text(expected)
        return 0
    actual = TARGET.read_text() if TARGET.exists() else ""
    if actual == expected:
        return 0
    diff = difflib.unified_diff(
        actual.splitlines(keepends=True),
        expected.splitlines(keepends=True),
        f"{TARGET.name} (committed)",
        f"{TARGET.name} (generated from {SOURCE.name})",
    )
    sys.stderr.writelines(diff)
    print(f"unasync: {TARGET} is out of date: run scripts/unasync.py", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
