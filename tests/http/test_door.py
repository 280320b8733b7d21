"""The HTTP listeners' door: out of resources, accept pauses instead of spinning (a
listener that stays readable would otherwise be accepted from in a busy loop), other
errors end the accept; refusals are logged once per interval, with how many they stand for.

The listener here is a fake that raises what the kernel would, as trio's own
`test_highlevel_serve_listeners` fakes EMFILE: a real process cannot be made to run out
of file descriptors just for one accept."""

from __future__ import annotations

import errno
import logging
from typing import Any

import pytest
import trio
import trio.testing

from broker.http.door import ACCEPT_CAPACITY_ERRNOS, RefusalLog, accept_or_pause
from broker.observe.log import Events


class Lines(Events):
    """A log that keeps its lines."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("test"))
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


class FakeListener:
    """accept() raises each of `errors` once, then hands out `accepted`."""

    def __init__(self, *errors: OSError, accepted: object = "a socket") -> None:
        self.errors = list(errors)
        self.accepted = accepted
        self.calls = 0

    async def accept(self) -> tuple[object, object]:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.errors:
            raise self.errors.pop(0)
        return self.accepted, ("127.0.0.1", 1)


@pytest.mark.parametrize("code", sorted(ACCEPT_CAPACITY_ERRNOS))
async def test_out_of_resources_pauses_once_then_accepts(
    autojump_clock: trio.testing.MockClock, code: int
) -> None:
    log = Lines()
    listener = FakeListener(OSError(code, "out of resources"))
    start = trio.current_time()
    first = await accept_or_pause(listener, "proxy", log)  # type: ignore[arg-type]
    assert first is None
    assert trio.current_time() - start == pytest.approx(0.1)  # a pause, not a spin
    assert log.lines == [("accept_paused", {"listener": "proxy", "reason": "out of resources"})]
    second: object = await accept_or_pause(listener, "proxy", log)  # type: ignore[arg-type]
    assert second == "a socket"
    assert listener.calls == 2


async def test_any_other_accept_error_is_raised() -> None:
    listener = FakeListener(OSError(errno.EBADF, "bad descriptor"))
    with pytest.raises(OSError, match="bad descriptor"):
        await accept_or_pause(listener, "proxy", Lines())  # type: ignore[arg-type]


async def test_refusals_are_logged_once_per_interval_with_their_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log = Lines()
    door = RefusalLog("proxy", log)
    for _ in range(5):
        door.refused("stranger")
    door.refused("busy")
    await trio.sleep(10)
    door.refused("stranger")
    assert log.lines == [
        ("connection_refused", {"listener": "proxy", "reason": "stranger", "since": 1}),
        ("connection_refused", {"listener": "proxy", "reason": "busy", "since": 1}),
        ("connection_refused", {"listener": "proxy", "reason": "stranger", "since": 5}),
    ]
