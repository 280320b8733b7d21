"""Test-only faults in the daemon itself, off unless $GEINS_BROKER_TEST_FAULTS names them.

The systemd suite (tests/systemd) must show that a wedged daemon is killed by the
watchdog and restarted. A real wedge cannot be summoned from outside, so the daemon can
be asked to make one, but only when the variable is set in its environment (a unit
drop-in's Environment=, which only root can write). Never set it in production.

    GEINS_BROKER_TEST_FAULTS=hang-on-sigusr1

hang-on-sigusr1: SIGUSR1 blocks the event loop for good (a blocking sleep on the trio
thread), so WATCHDOG=1 pings stop as they would in a real deadlock; without the fault,
SIGUSR1 keeps its default action. An unknown name is a startup error, so a typo cannot
leave a test believing a fault is armed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Final, NoReturn

from broker.observe.log import events

ENV: Final = "GEINS_BROKER_TEST_FAULTS"
HANG_ON_SIGUSR1: Final = "hang-on-sigusr1"
KNOWN: Final = frozenset({HANG_ON_SIGUSR1})

log = events("broker.fault_injection")


class FaultSpecError(ValueError):
    """$GEINS_BROKER_TEST_FAULTS names a fault that does not exist."""


def armed(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The faults the environment asks for (comma-separated names; empty: none)."""
    env = os.environ if environ is None else environ
    names = frozenset(n.strip() for n in env.get(ENV, "").split(",") if n.strip())
    if unknown := names - KNOWN:
        raise FaultSpecError(
            f"{ENV}: unknown fault {', '.join(sorted(unknown))} (known: {', '.join(sorted(KNOWN))})"
        )
    return names


def hang() -> NoReturn:
    """Block the calling thread (the event loop's) until the process is killed."""
    log.warning("test_fault", fault=HANG_ON_SIGUSR1)
    while True:
        time.sleep(3600)  # wedging the loop is the point
