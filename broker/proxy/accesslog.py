"""The proxy's access log: one line per request, written in batches off the hot path.

A request's end records a tuple (no formatting, no logging call); a task writes the
lines at most `FLUSH_INTERVAL` later, or sooner once `FLUSH_AT` wait. The lines are
the same `event=request` lines as before, with the same fields: method, path (never
the query string, which may carry anything), status, ms, profile, uid; a request by
handle has `app=` and `session=` (8 hex digits of the session id, `-` when none was
found) instead of `profile=`, never the handle. At most
`MAX_PENDING` wait: past that (a log that cannot keep up), lines are dropped and the
next written line says how many (`dropped=`).
"""

from __future__ import annotations

import logging
from typing import Final

import trio

from broker.customers.model.handles import log_id
from broker.observe.log import events, field_text, write_lines

log = events("broker.proxy")

FLUSH_INTERVAL: Final = 0.25
FLUSH_AT: Final = 512
MAX_PENDING: Final = 65536

Record = tuple[bytes, bytes, int, float, str, int | None, bytes | None]


class AccessLog:
    def __init__(self) -> None:
        self._pending: list[Record] = []
        self._wake = trio.Event()
        self._full = trio.Event()
        self._dropped = 0
        self._logger = logging.getLogger("broker.proxy")

    def record(  # noqa: PLR0917 (positional: called per request, keywords cost)
        self,
        method: bytes,
        target: bytes,
        status: int,
        elapsed: float,
        profile: str,
        uid: int | None,
        session: bytes | None = None,
    ) -> None:
        """`profile`: the profile's name, or the app's for a request by handle, which
        gives `session` (its session id, or b"" when none was found)."""
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            self._dropped += 1
            return
        pending.append((method, target, status, elapsed, profile, uid, session))
        if len(pending) == 1:
            self._wake.set()
        elif len(pending) == FLUSH_AT:
            self._full.set()

    def flush(self) -> None:
        """Write every pending line now: the fields formatted here (what `Events.info`
        would make, without its per-field checks: these fields are a method token,
        numbers, and two strings quoted when they need it), the batch in one write
        (`write_lines`)."""
        pending, self._pending = self._pending, []
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        lines = []
        # The paths and names of one batch repeat: each is made into text once.
        texts: dict[bytes | str, str] = {}
        for method, target, status, elapsed, profile, uid, session in pending:
            path = texts.get(target)
            if path is None:
                path = texts[target] = field_text(target.split(b"?", 1)[0].decode("latin-1"))
            name = texts.get(profile)
            if name is None:
                name = texts[profile] = field_text(profile)
            line = (
                f"event=request method={method.decode('ascii', 'replace')} "
                f"path={path} status={status} "
                f"ms={_ms(elapsed)} "
                + (
                    f"profile={name}"
                    if session is None
                    else f"app={name} session={log_id(session) if session else '-'}"
                )
            )
            if uid is not None:
                line += f" uid={uid}"
            lines.append(line)
        write_lines(logger, logging.INFO, lines)
        if self._dropped:
            log.warning("access_log_dropped", dropped=self._dropped)
            self._dropped = 0

    async def run(self) -> None:
        """Flush every `FLUSH_INTERVAL` (or at `FLUSH_AT` lines) until cancelled; what
        is pending then is written too."""
        try:
            while True:
                await self._wake.wait()
                with trio.move_on_after(FLUSH_INTERVAL):
                    await self._full.wait()
                self._wake, self._full = trio.Event(), trio.Event()
                self.flush()
        finally:
            self.flush()


def _ms(elapsed: float) -> str:
    """Milliseconds to one decimal, without a trailing ".0": what `field_text` makes of
    `round(elapsed * 1000, 1)`, in one format."""
    text = f"{elapsed * 1000:.1f}"
    return text[:-2] if text.endswith(".0") else text
