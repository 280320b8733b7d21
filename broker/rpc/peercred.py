"""Who is on the other end of a Unix socket, as the kernel says.

SO_PEERCRED gives the pid, uid and gid recorded at connect(); SO_PEERGROUPS the
supplementary groups, with /proc/PID/status as the fallback where the kernel cannot say.
Both the broker socket (`reactor`) and the proxy's Unix listener (`proxy.peers`) ask
here; the proxy's loopback TCP callers are identified in `proxy.peers`, which builds the
same `Peer`.

Linux only: SO_PEERCRED and SO_PEERGROUPS are Linux interfaces, and the daemon is a
Linux service (systemd units).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass
from typing import Final

from broker.observe.log import events

log = events("broker.server")

_CREDENTIALS: Final = struct.Struct("3i")
#: Linux's SO_PEERGROUPS (4.13+); the stdlib does not name it.
_SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
#: The most CPython's getsockopt reads: 256 gids.
_GROUPS_BUFFER: Final = 1024


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a connection, as the kernel says (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def peer_of(sock: socket.socket) -> Peer:
    """The connected Unix socket's peer. Raises OSError when the socket is gone."""
    pid, uid, gid = _CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    )
    return Peer(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """The peer's supplementary groups, as the kernel recorded them at connect().

    CPython's getsockopt takes at most 1024 bytes, room for 256 groups; a peer in more
    gets ERANGE, a kernel before 4.13 ENOPROTOOPT. Then /proc/PID/status says, which is
    the process's groups now rather than at connect() (and a PID may be reused), so the
    fallback is logged: `allow_groups` must never quietly shrink to the primary group.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _GROUPS_BUFFER)
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, str(exc))
        if exc.errno == errno.ERANGE:
            log.info("peer_groups_from_proc", pid=pid, reason="over_256_groups")
        else:
            log.warning("peer_groups_from_proc", pid=pid, reason=reason)
        return _groups_from_proc(pid)
    return frozenset(struct.unpack(f"{len(raw) // 4}I", raw))


def _groups_from_proc(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(gid) for gid in line.split()[1:])
        problem = "no Groups line"
    except (OSError, ValueError) as exc:
        problem = getattr(exc, "strerror", None) or type(exc).__name__
    log.warning("peer_groups_unknown", pid=pid, reason=problem)
    return frozenset()
