"""`[proxy]`: the Merchant API proxy's listeners and limits (docs/proxy.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker.core.tables import TableReader
from broker.daemon.config_values import HOUR, check_socket_path
from geins_broker_client.paths import SOCKET_NAME

#: The proxy's Unix socket, next to the broker's.
PROXY_SOCKET_NAME: Final = "merchant.sock"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The Merchant API proxy's listeners and limits (`[proxy]`; docs/proxy.md)."""

    #: The Unix socket, or None when `unix = false`.
    socket: Path | None
    #: Loopback TCP (host, port), or None.
    tcp: tuple[str, int] | None = None
    #: The profile a request without a Geins-Broker-Profile header uses.
    profile: str = "default"
    max_connections: int = 256
    max_header_size: int = 16 * 1024
    max_body_size: int = 10 * 1024 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    upstream_timeout: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.socket is not None or self.tcp is not None


#: No listener: the proxy off, as a `BrokerConfig` built in code has it.
NO_PROXY: Final = ProxyConfig(socket=None)


def parse_proxy(r: TableReader, broker_socket: Path) -> ProxyConfig:
    socket = None
    if r.get("unix", bool, True):
        socket = Path(r.get("socket", str) or default_proxy_socket(broker_socket))
        check_socket_path(r, "socket", socket)
    tcp = r.get("tcp", str)
    config = ProxyConfig(
        socket=socket,
        tcp=None if tcp is None else _loopback(r, tcp),
        profile=r.text("profile", "default"),
        max_connections=r.count("max_connections", 256),
        max_header_size=r.count("max_header_size", 16 * 1024),
        max_body_size=r.count("max_body_size", 10 * 1024 * 1024),
        header_timeout=r.seconds("header_timeout", 10.0, most=HOUR),
        idle_timeout=r.seconds("idle_timeout", 60.0, most=HOUR),
        upstream_timeout=r.seconds("upstream_timeout", 30.0, most=HOUR),
    )
    if config.max_header_size < 1024:
        raise r.error("max_header_size", "must be at least 1024")
    r.check_unknown()
    return config


def default_proxy_socket(broker_socket: Path) -> Path:
    """`merchant.sock` next to the broker's socket; next to a socket given another name
    (`NAME.sock`), `NAME.merchant.sock`, so daemons sharing a directory do not collide."""
    if broker_socket.name == SOCKET_NAME:
        return broker_socket.parent / PROXY_SOCKET_NAME
    return broker_socket.parent / f"{broker_socket.name.removesuffix('.sock')}.{PROXY_SOCKET_NAME}"


def _loopback(r: TableReader, value: str) -> tuple[str, int]:
    """`127.0.0.1:PORT` or `[::1]:PORT`, nothing else: the proxy hands out a user's
    session, and only on loopback can it tell which local user is calling."""
    for prefix, host in (("127.0.0.1:", "127.0.0.1"), ("[::1]:", "::1")):
        port = value.removeprefix(prefix)
        if port != value and port.isdigit() and int(port) <= 65535:
            return host, int(port)
    raise r.error("tcp", f"must be 127.0.0.1:PORT or [::1]:PORT (loopback only), got {value!r}")
