"""The client for asyncio programs: the stdlib socket driven by the running loop."""

from __future__ import annotations

from ._async.client import DEFAULT_TIMEOUT, AsyncClient
from ._backends.asyncio import AsyncioBackend

TYPE_CHECKING = False
if TYPE_CHECKING:
    import os


class AsyncioClient(AsyncClient):
    """The client on asyncio's event loop (`AsyncClient` with asyncio's transport)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(socket_path, timeout=timeout, backend=AsyncioBackend())
