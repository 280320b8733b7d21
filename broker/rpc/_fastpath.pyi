"""Types of the optional C extension built from _fastpath.c (see fastpath.py)."""

from collections.abc import Mapping

class Fastpath:
    @property
    def answered(self) -> int: ...
    def __init__(
        self,
        epoll_fd: int,
        connections: Mapping[int, object],
        profiles: Mapping[str, object],
        default_profile: str,
        session_ops: object,
        max_events: int = 1024,
    ) -> None: ...
    def poll(
        self, wall_now: float, loop_now: float, /
    ) -> list[tuple[int, int, bytes | None, bytes | None]] | None: ...
