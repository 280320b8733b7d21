"""systemd's notify protocol: READY=1, STATUS=..., STOPPING=1, WATCHDOG=1.

A few lines over the $NOTIFY_SOCKET datagram socket, and a no-op when the variable is
unset, so the daemon calls it unconditionally.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from broker.observe.log import events

log = events("broker.notify")


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = self._own_watchdog(env)

    @staticmethod
    def _own_watchdog(env: Mapping[str, str]) -> int | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID")
        if not usec.isdigit() or int(usec) == 0 or (pid is not None and pid != str(os.getpid())):
            return None
        return int(usec)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2e6

    def send(self, *lines: str) -> None:
        if not self._address:
            return
        message = "\n".join(lines).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.setblocking(False)
                sock.sendto(message, self._address)
            except OSError as exc:
                log.warning("notify_failed", reason=exc.strerror)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=reloading configuration")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
