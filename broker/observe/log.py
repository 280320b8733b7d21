"""One line per event, key=value pairs, on stderr; journald priorities under systemd.

    log = events("broker.profile")
    log.info("refreshed", profile="default", expires_in=900)

prints `... level=info event=refreshed profile=default expires_in=900`. Values are
whatever `str()` makes of them, so a `Secret` shows as redacted; nobody passes a token
here in the first place.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Final, TextIO

_JOURNAL_PRIORITY: Final = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def _value(value: Any) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    if not text or not text.isprintable() or " " in text or '"' in text or "=" in text:
        text = '"' + "".join(map(_escaped, text)) + '"'
    return text


def _escaped(c: str) -> str:
    """One character of a quoted value: a control or other unprintable character (C0,
    DEL, C1 such as CSI, a bidirectional override) as an escape, so that a value from
    a caller, a store or an upstream moves, colours or reorders nothing on a terminal
    showing the log."""
    if c.isprintable():
        return "\\" + c if c in '\\"' else c
    return _NAMED_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


_NAMED_ESCAPES: Final = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


#: How a field's value is written, for a caller that formats its lines itself (the
#: proxy's batched access log).
field_text = _value


class _Formatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.prefix(record.levelno, record.created)}{record.getMessage()}"
        if record.exc_info:
            line += " traceback=" + _value(self.formatException(record.exc_info))
        return line

    def prefix(self, level: int, created: float) -> str:
        """What goes before a line's `event=`: the journald priority or the time, and
        the level."""
        name = logging.getLevelName(level).lower()
        if self.journald:
            return f"<{_JOURNAL_PRIORITY.get(level, 6)}>level={name} "
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        return f"{stamp}.{int((created - int(created)) * 1000):03d}Z level={name} "


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The daemon's stderr handler (`setup`); it can also write a batch of lines at once."""

    formatter: _Formatter

    def write_lines(self, level: int, lines: list[str]) -> None:
        """`lines` (each an `event=...` message) as one write and one flush, all with
        the time of this call: what one record per line would print, less a record,
        a format and a flush (a system call) per line."""
        prefix = self.formatter.prefix(level, time.time())
        text = "".join([f"{prefix}{line}\n" for line in lines])
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "write_lines", "levelno": level}))
        finally:
            self.release()


def write_lines(logger: logging.Logger, level: int, lines: list[str]) -> None:
    """Write `lines` (`event=...` messages, already formatted: values through
    `field_text`) at `level`: in one write when every handler they would reach is the
    daemon's own (`setup`) and nothing filters them; else one record each, through
    `logging` (a test's capture, a handler set up elsewhere)."""
    if not lines or not logger.isEnabledFor(level):
        return
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            handlers = []
            break
        handlers += current.handlers
        current = current.parent if current.propagate else None
    ours = [
        h
        for h in handlers
        if isinstance(h, _Handler) and type(h) is _Handler and not h.filters and level >= h.level
    ]
    if ours and len(ours) == len(handlers):
        for handler in ours:
            handler.write_lines(level, lines)
        return
    make, handle, name = logger.makeRecord, logger.handle, logger.name
    for line in lines:
        handle(make(name, level, "", 0, "%s", (line,), None))


def under_journald() -> bool:
    """systemd connects stderr to the journal and says so in $JOURNAL_STREAM."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(_Formatter(journald=under_journald()))
    root = logging.getLogger("broker")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class Events:
    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _emit(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        logger = self._logger
        if logger.isEnabledFor(level):
            pairs = "".join(f" {k}={_value(v)}" for k, v in fields.items() if v is not None)
            # What Logger.log does, less its walk up the stack for the caller's file and
            # line (a third of a line's cost; the proxy logs a line per request), which
            # no line here shows.
            record = logger.makeRecord(
                logger.name,
                level,
                "",
                0,
                "event=%s%s",
                (event, pairs),
                sys.exc_info() if exc_info else None,
            )
            logger.handle(record)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._emit(logging.ERROR, event, fields, exc_info=True)


def events(name: str) -> Events:
    return Events(logging.getLogger(name))
