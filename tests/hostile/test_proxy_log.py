"""What the proxy writes to the daemon's log, when a hostile caller chooses the bytes.

The parser (llhttp) refuses C0 controls and DEL in a request's target and header
values, but lets obs-text (0x80-0xFF) through in a value; decoded as Latin-1 those
include the C1 controls, among them CSI (0x9B), which a terminal showing the log
(journalctl, `tail -f`) may obey as ESC [. The header sent here is one the access log
shows: `profile=` is the name the caller asked for, even when no such profile exists.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.observe.log import field_text
from tests.proxy.sessions_stack import SessionStack, session_stack
from tests.support import NOBODY, as_uid, wait_until

#: CSI (its one-byte C1 form) to clear the screen and turn the text red, then NEL and a
#: no-break space; as curl sends it, each byte raw (surrogate escapes in argv).
PLANTED = "p\udc9b2J\udc9b31mowned\udc85\udca0"


def _controls(text: str) -> list[str]:
    """The control and format characters in `text` (a line's own newline aside)."""
    return [c for c in text if unicodedata.category(c) in ("Cc", "Cf") and c != "\n"]


def test_log_values_escape_every_control_character() -> None:
    for value in ("a\x9bb", "a\rb", "a\x1b[2Jb", "a\x85b", "a\u202eb", "a\x00b", "a\x7fb"):
        written = field_text(value)
        assert _controls(written) == [], (value, written)
    assert field_text("a\rb") == '"a\\rb"'
    assert field_text("a\x9bb") == '"a\\x9bb"'
    assert field_text("a\nb c") == '"a\\nb c"'
    assert field_text("plain") == "plain"
    assert field_text("Åsa") == "Åsa"


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[SessionStack]:
    yield from session_stack(short_tmp)


@pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")
def test_a_profile_header_reaches_the_log_without_controls(stack: SessionStack) -> None:
    for via in ("unix", "tcp"):
        status, _ = stack.curl(f"Geins-Broker-Profile: {PLANTED}", via=via, as_user=as_uid(NOBODY))
        assert status in (403, 404), status
    wait_until(lambda: stack.daemon.log().count("owned") >= 2, 5, "the access lines")
    lines = [line for line in stack.daemon.log().splitlines() if "owned" in line]
    assert len(lines) == 2, lines
    for line in lines:
        assert _controls(line) == [], line
        assert 'profile="p\\x9b2J\\x9b31mowned\\x85\\xa0"' in line, line
