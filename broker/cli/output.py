"""How the CLI prints: text it did not write made safe for a terminal, times, tables,
JSON, and the token.

Node names, lease holders and store errors come from Redis, which every local user may
write when it has no password; a profile's `user` fields and a bearer's claims come from
Geins (or whoever answers in its place); error messages come from the daemon, which
repeats what those said. Printed raw, an escape sequence among them sets the terminal's
title, clears the screen or writes the clipboard (OSC 52) of whoever runs `status`.

`terminal_safe` writes every control character (C0, DEL, C1) as a visible escape
(`\\x1b`, `\\x9b`), and every bidirectional formatting character as `\\u202e` and
the like, and keeps every other character, printable Unicode included, as it is. This
module imports nothing at run time (json and time only when a function needs them), so
`geins-broker token` pays nothing for it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not even typing at run time: `geins-broker token` loads this
if TYPE_CHECKING:
    from collections.abc import Sequence

    from geins_broker_client.results import Token

_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0)]
#: Bidirectional marks, embeddings, overrides and isolates: printed, they make a line
#: show its text in another order than it has ("Trojan Source"), so that a listed
#: username reads as someone else's.
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_ESCAPED = {
    **{code: f"\\x{code:02x}" for code in _CONTROLS},
    **{code: f"\\u{code:04x}" for code in _BIDI},
}
#: The same, keeping line breaks: for multi-line text such as the metrics exposition.
_ESCAPED_KEEPING_LINES = {code: text for code, text in _ESCAPED.items() if code != 0x0A}


def terminal_safe(value: object, *, keep_newlines: bool = False) -> str:
    """`str(value)` with each control character written as `\\xNN` (a newline kept
    when `keep_newlines`) and each bidirectional formatting character as `\\uNNNN`, so
    that printing it moves, colours, retitles or reorders nothing."""
    return str(value).translate(_ESCAPED_KEEPING_LINES if keep_newlines else _ESCAPED)


def print_token(token: Token, *, as_json: bool) -> None:
    """`geins-broker token`'s output: the bare token, or one JSON object."""
    if as_json:
        print_json(token_fields(token))
    else:
        print(terminal_safe(token.token))


def token_fields(token: Token) -> dict[str, object]:
    """A token as the CLI's JSON shows it (`token --json`, `watch --json`)."""
    return {"profile": token.profile, "token": token.token, "expires_at": token.expires_at}


def print_json(value: object) -> None:
    """One JSON object on one line, keys sorted: what every `--json` prints."""
    import json

    print(json.dumps(value, separators=(",", ":"), sort_keys=True))


def iso_time(when: float | None) -> str:
    """A wall-clock time in UTC, ISO 8601 to the second; "-" for none."""
    if when is None:
        return "-"
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def countdown(when: float | None, now: float) -> str:
    """How long from `now` until `when`, as `1h05m`, `4m02s` or `9s` (negative when
    past); "-" for none."""
    if when is None:
        return "-"
    seconds = round(when - now)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds >= 3600:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{sign}{seconds // 60}m{seconds % 60:02d}s"
    return f"{sign}{seconds}s"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, every cell escaped for the terminal."""
    safe = [[terminal_safe(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in safe) for i in range(len(safe[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in safe
    )
