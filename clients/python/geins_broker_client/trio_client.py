"""The client for trio programs. Importing it imports trio; the package root does not."""

from __future__ import annotations

from ._async.client import DEFAULT_TIMEOUT, AsyncClient
from ._backends.trio import TrioBackend

TYPE_CHECKING = False
if TYPE_CHECKING:
    import os


class TrioClient(AsyncClient):
    """The client on trio's event loop (`AsyncClient` with trio's transport)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(socket_path, timeout=timeout, backend=TrioBackend())
