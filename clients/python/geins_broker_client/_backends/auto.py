"""The transport an `AsyncClient` gets when none is given: the running event loop's."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .base import AsyncBackend


def default_backend() -> AsyncBackend:
    """Trio's backend inside `trio.run`, asyncio's inside a running asyncio loop."""
    if "trio" in sys.modules:
        import trio

        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            from .trio import TrioBackend

            return TrioBackend()
    from .asyncio import AsyncioBackend

    return AsyncioBackend()
