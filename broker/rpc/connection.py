"""One broker connection's state, shared by the reactor (which reads and writes its
socket) and the dispatcher (whose waiting ops answer through it later)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from geins_broker_client.protocol import MAX_REQUEST_SIZE, FrameDecoder

if TYPE_CHECKING:
    import socket

    import trio

    from broker.rpc.peercred import Peer
    from geins_broker_client.protocol import Message

INF: Final = float("inf")


class Connection:
    """One client: its socket, what it has half-sent, what it has not read yet.

    A record of slots, not a class with behaviour: the reactor reads and writes these
    fields on every request, and a slot is the cheapest place for each. Fifteen fields
    are one connection's state; grouping them into sub-objects would add a lookup per
    field on the token hot path for no separation of concerns."""

    __slots__ = (
        "acl_cache",
        "blocked_since",
        "closed",
        "closing",
        "decoder",
        "fd",
        "held",
        "last_active",
        "out",
        "partial_since",
        "peer",
        "sock",
        "stranger",
        "tasks",
        "waiting",
    )

    def __init__(
        self, sock: socket.socket, peer: Peer, now: float, *, stranger: bool = False
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        #: The peer may read no profile: it gets the short idle timeout.
        self.stranger = stranger
        self.decoder = FrameDecoder(MAX_REQUEST_SIZE)
        #: Answers the socket would not take yet; while any wait, no requests are read.
        self.out = bytearray()
        #: Requests decoded but not answered: their batch's answers outgrew one write
        #: and the client is not reading them. Answered once `out` is flushed.
        self.held: list[Message] | None = None
        self.blocked_since = INF
        self.last_active = now
        #: When the half-received frame now buffered began to arrive.
        self.partial_since = INF
        #: Whether this peer may read a profile, decided once per connection and
        #: profile configuration (a reload replaces the configuration object).
        self.acl_cache: dict[str, tuple[object, bool]] = {}
        #: Ops of this connection still waiting, and their cancel scopes.
        self.waiting = 0
        self.tasks: set[trio.CancelScope] = set()
        #: Close once `out` is flushed (after a bad frame).
        self.closing = False
        self.closed = False
