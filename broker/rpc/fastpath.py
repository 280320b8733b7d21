"""The token hot path in C, when it is built: `_fastpath.c`, loaded here or not at all.

The extension is optional. `pip install` builds it when a C compiler and Python's
headers are present (`setup.py` marks it optional, so a failed build installs the pure
package), and `scripts/_venv.sh` builds it in place for the development tree. Without
it the reactor serves every request in Python, with the same answers: the C path
answers only what the Python hot path has already decided (its source says how), and
the test suite runs the broker socket's tests both ways.

`GEINS_BROKER_FASTPATH=0` in the daemon's environment turns it off (to compare the
two, or to rule it out while chasing a bug).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from broker.rpc._fastpath import Fastpath
    from broker.rpc.connection import Connection


def _load() -> tuple[type[Fastpath] | None, str | None]:
    try:
        from broker.rpc._fastpath import Fastpath
    except ImportError as exc:  # not built: the pure reactor serves alone
        return None, f"not built ({exc})"
    return Fastpath, None


_FASTPATH, _WHY_NOT = _load()

#: The environment variable that turns the accelerator off when it is "0".
SWITCH: Final = "GEINS_BROKER_FASTPATH"


def built() -> str | None:
    """Why the C hot path was not built (the import's error), or None when it was."""
    return _WHY_NOT


def unavailable() -> str | None:
    """Why the C hot path will not run (not built, or switched off), or None if it will."""
    if _WHY_NOT is not None:
        return _WHY_NOT
    if os.environ.get(SWITCH, "1") == "0":
        return f"switched off ({SWITCH}=0)"
    return None


def make(
    epoll_fd: int,
    connections: dict[int, Connection],
    profiles: Mapping[str, object],
    default: str,
    session_ops: object,
) -> Fastpath | None:
    """The accelerator over the reactor's epoll and tables, or None to serve in Python.

    The profile table must be the daemon's own dict (changed in place on reload): the C
    path reads it directly. Any other mapping is served in Python."""
    if _FASTPATH is None or unavailable() is not None or type(profiles) is not dict:
        return None
    return _FASTPATH(epoll_fd, connections, profiles, default, session_ops)
