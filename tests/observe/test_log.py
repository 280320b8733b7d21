"""The daemon's log lines: a batch written at once reads as the same lines one by one."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from broker.observe import log


class CountingStream(io.StringIO):
    """A stream that counts its writes (one write, one system call on a real file)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def restore_broker_logger() -> Iterator[None]:
    root = logging.getLogger("broker")
    saved = root.handlers[:], root.level, root.propagate
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


def _without_time(text: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in text.splitlines()]


@pytest.mark.usefixtures("restore_broker_logger")
def test_a_batch_is_one_write_of_the_lines_events_would_write() -> None:
    stream = CountingStream()
    log.setup("info", stream)
    log.events("broker.proxy").info("request", path="/graphql", status=200)
    one_by_one = stream.getvalue()
    stream.seek(0)
    stream.truncate()
    stream.writes = 0
    lines = ["event=request path=/graphql status=200"] * 3
    log.write_lines(logging.getLogger("broker.proxy"), logging.INFO, lines)
    assert stream.writes == 1
    assert _without_time(stream.getvalue()) == _without_time(one_by_one) * 3
    # Below the level: nothing.
    log.write_lines(logging.getLogger("broker.proxy"), logging.DEBUG, lines)
    assert stream.writes == 1


@pytest.mark.usefixtures("restore_broker_logger")
def test_a_batch_goes_through_logging_to_any_other_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = logging.getLogger("broker")
    root.handlers[:] = []
    root.propagate = True
    with caplog.at_level(logging.INFO, logger="broker.proxy"):
        log.write_lines(logging.getLogger("broker.proxy"), logging.INFO, ["event=a x=1", "event=b"])
    assert [r.getMessage() for r in caplog.records] == ["event=a x=1", "event=b"]
