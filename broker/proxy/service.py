"""The proxy's listeners, served by the shared HTTP shell, inside the daemon.

The Unix socket is made like the broker's (listener.bind: private from the first
instant, the broker's mode and group, a stale file replaced, a live one refused); the
peer is SO_PEERCRED's. The TCP listener binds loopback only (config refuses any other
address) and identifies each peer's uid through the kernel (peers.tcp_peer).

Who may hold a connection (`ProxyAdmission`, asked as each is accepted) follows the
broker socket's rule: a peer the proxy would refuse every request (unknown, or a uid
that may read no profile nor the metrics) is turned away with a 403 at once; no uid but
root and the daemon's may hold more than `[broker] max_connections_per_uid` of a
listener's connections, and the last `admin_reserved_connections` (at most half) are
theirs. Over TCP any local uid can connect, so without this one uid's idle connections
locked everyone out.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from broker.core.clock import WallClock
from broker.daemon.config import BrokerConfig
from broker.http.server import HttpLimits, HttpServer, Refusal
from broker.observe.log import events
from broker.observe.metrics import Metrics
from broker.observe.routes import Observable
from broker.policy.headers import error_body
from broker.proxy.handler import ProxyApp
from broker.proxy.peers import tcp_peer, unix_peer
from broker.rpc.listener import Listener, ListenerError, bind
from broker.rpc.ops import Api
from broker.rpc.peercred import Peer

log = events("broker.proxy")


def limits_of(config: BrokerConfig) -> HttpLimits:
    proxy = config.proxy
    return HttpLimits(
        max_connections=proxy.max_connections,
        max_header_size=proxy.max_header_size,
        max_body_size=proxy.max_body_size,
        header_timeout=proxy.header_timeout,
        idle_timeout=proxy.idle_timeout,
    )


class ProxyAdmission:
    """The connection rule of one listener (module docstring)."""

    def __init__(self, api: Api, config: BrokerConfig) -> None:
        self.api = api
        self.config = config
        self._per_uid: Counter[int] = Counter()

    def refusal(self, peer: Peer | None, connections: int, limits: HttpLimits) -> Refusal | None:
        most = limits.max_connections
        if peer is None:
            return (403, "forbidden", "the broker cannot tell which user is calling")
        if self.api.is_admin(peer):
            return None if connections < most else _full(most)
        if not self.api.may_scrape(peer) and not any(
            self.api.may_read(peer, profile) for profile in self.api.profiles.values()
        ):
            return (403, "forbidden", f"uid {peer.uid} may read no profile")
        reserve = min(self.config.admin_reserved_connections, most // 2)
        if connections >= most - reserve:
            return _full(most)
        if self._per_uid[peer.uid] >= self.config.max_connections_per_uid:
            return (503, "max_per_uid", "too many connections from this user; try again")
        return None

    def opened(self, peer: Peer | None) -> None:
        if peer is not None:
            self._per_uid[peer.uid] += 1

    def closed(self, peer: Peer | None) -> None:
        if peer is not None:
            self._per_uid[peer.uid] -= 1
            if self._per_uid[peer.uid] <= 0:
                del self._per_uid[peer.uid]


def _full(most: int) -> Refusal:
    return (503, "max_connections", f"all {most} connections are taken; try again")


class Proxy:
    def __init__(
        self,
        api: Api,
        config: BrokerConfig,
        wall: WallClock,
        *,
        observable: Observable | None = None,
        metrics: Metrics | None = None,
        offload: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    ) -> None:
        self.config = config
        #: Runs the TCP peer look-up off the event loop (the daemon's own offload).
        self._offload = offload
        self.app = ProxyApp(api, config.proxy, wall, observable=observable, metrics=metrics)
        self.servers: list[HttpServer] = []
        self.admissions: list[ProxyAdmission] = []
        self.unix: Listener | None = None
        #: The TCP address actually bound (port 0 in the config: the kernel's choice).
        self.tcp_address: tuple[str, int] | None = None
        self._listeners: list[tuple[trio.socket.SocketType, Any, str]] = []

    @property
    def connections(self) -> int:
        return sum(server.connections for server in self.servers)

    def configure(self, config: BrokerConfig) -> None:
        """A reload: new limits, profile and timeouts; the listeners stay as they are."""
        old = self.config.proxy
        if (config.proxy.socket, config.proxy.tcp) != (old.socket, old.tcp):
            log.warning("reload_needs_restart", key="proxy listeners")
        self.config = config
        self.app.config = config.proxy
        for server in self.servers:
            server.limits = limits_of(config)
        for admission in self.admissions:
            admission.config = config

    def bind(self) -> None:
        """Take the listening sockets (before serving, so a failure stops the start-up
        with a clear ListenerError)."""
        config = self.config
        try:
            if config.proxy.socket is not None:
                mode = config.socket_mode or (0o660 if config.socket_group else 0o600)
                self.unix = bind(config.proxy.socket, mode, config.socket_group)
                sock = trio.socket.from_stdlib_socket(self.unix.sock)
                self._listeners.append((sock, unix_peer, "proxy-unix"))
            if config.proxy.tcp is not None:
                tcp = _bind_tcp(*config.proxy.tcp)
                self._listeners.append((tcp, tcp_peer, "proxy-tcp"))
                self.tcp_address = tcp.getsockname()[:2]
        except ListenerError:
            self.close()
            raise

    @property
    def in_flight(self) -> int:
        return sum(server.in_flight for server in self.servers)

    async def drained(self) -> None:
        """Return once no proxied request is under way (the listeners being closed)."""
        for server in self.servers:
            await server.drained()

    def describe(self) -> dict[str, object]:
        """Where it listens, for the daemon's `ready` line."""
        return {
            "proxy_socket": self.config.proxy.socket,
            "proxy_tcp": None if self.tcp_address is None else _address(self.tcp_address),
        }

    def close(self) -> None:
        """Close the listeners (and remove the Unix socket file this daemon made)."""
        for sock, _, _ in self._listeners:
            sock.close()
        self._listeners.clear()
        if self.unix is not None:
            self.unix.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the bound listeners until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                for sock, identify, name in self._listeners:
                    admission = ProxyAdmission(self.app.api, self.config)
                    self.admissions.append(admission)
                    server = HttpServer(
                        self.app.handle,
                        limits_of(self.config),
                        identify=identify,
                        error_body=error_body,
                        name=name,
                        admission=admission,
                        identify_blocks=identify is tcp_peer,
                        offload=self._offload,
                    )
                    self.servers.append(server)
                    await nursery.start(server.serve, sock)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self.close()
            with trio.CancelScope(shield=True):
                await self.app.aclose()


def _bind_tcp(host: str, port: int) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot listen on {_address((host, port))}: {exc.strerror}") from None
    return trio.socket.from_stdlib_socket(sock)


def _address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
