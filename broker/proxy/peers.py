"""Who is calling: the uid behind a connection, on the Unix socket and on loopback TCP.

On the Unix socket the kernel says (SO_PEERCRED, SO_PEERGROUPS; `rpc.peercred`). Over
TCP nothing in the connection carries a uid, but both ends live in this kernel, which
knows who owns the client's socket. We ask it by the connection's exact 4-tuple with
sock_diag (NETLINK_SOCK_DIAG, an inet_diag request for one socket, not a dump), and,
where netlink is not allowed (a systemd unit whose RestrictAddressFamilies lacks
AF_NETLINK), read /proc/net/tcp{,6} for the line whose exact 4-tuple matches.

The kernel vouches for a uid only while a process holds the client's socket. Once the
client closes it, the socket is an orphan and soon a timewait entry, which both
look-ups report as uid 0 with inode 0: a caller that closes at once after sending, while
accept() is behind, would be taken for root. So a uid is believed only from an answer
for exactly the 4-tuple asked, in a state of a live connection (`_LIVE_STATES`), with a
non-zero inode (a socket some process still holds); anything else is None, and the
proxy refuses it (403), however late the look-up runs. A peer neither look-up can place
(it closed already, it lives in another network namespace, /proc/net is hidden) is
None too.

Over TCP the kernel knows the socket's uid, not the groups of the process behind it:
the groups are the uid's own (its passwd entry and group memberships), looked up and
kept for a minute.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import pwd
import socket
import struct
import time
from typing import Any, Final

from broker.observe.log import events
from broker.rpc.peercred import Peer, peer_of

log = events("broker.proxy")

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x01
_NLMSG_ERROR: Final = 2
_NLMSG: Final = struct.Struct("=IHHII")
#: inet_diag_req_v2 before its sockid: family, protocol, ext, pad, states.
_REQ: Final = struct.Struct("=BBBBI")
#: inet_diag_sockid: sport, dport (big-endian), src[16], dst[16]; then if, cookie[2].
_SOCKID: Final = struct.Struct("!HH16s16s")
_SOCKID_TAIL: Final = struct.Struct("=III")
#: inet_diag_msg: family, state, timer, retrans; its sockid; then (`_MSG_TAIL`)
#: expires, rqueue, wqueue, uid, inode.
_MSG_HEAD: Final = struct.Struct("=BBBB")
_MSG_TAIL: Final = struct.Struct("=IIIII")
_NO_COOKIE: Final = 0xFFFFFFFF
#: The client end's states (include/net/tcp_states.h) we believe a uid in: connected,
#: or half-closed by the client after its request (FIN_WAIT1/2, as `nc -N` and some
#: HTTP/1.0 clients do) while it still holds the socket, which the inode shows. The
#: client end of a connection we have accepted and not yet answered is never in
#: another state while its process holds it; SYN_SENT, TIME_WAIT, CLOSE and the rest
#: are a different connection or none.
_ESTABLISHED: Final = 1
_FIN_WAIT1: Final = 2
_FIN_WAIT2: Final = 3
_LIVE_STATES: Final = frozenset({_ESTABLISHED, _FIN_WAIT1, _FIN_WAIT2})
#: The same states as inet_diag's `idiag_states` bitmask (asked for; checked again in
#: the answer, since an exact look-up need not honour it).
_LIVE_STATE_MASK: Final = sum(1 << state for state in _LIVE_STATES)
_DIAG_TIMEOUT: Final = 1.0
_GROUPS_TTL: Final = 60.0
_GROUPS_KEPT: Final = 256
_DIAG_MSG_SIZE: Final = (
    _NLMSG.size + _MSG_HEAD.size + _SOCKID.size + _SOCKID_TAIL.size + _MSG_TAIL.size
)


def unix_peer(sock: Any) -> Peer:
    """The Unix socket's peer, as the kernel says."""
    return peer_of(sock)


def tcp_peer(sock: Any) -> Peer | None:
    """The loopback TCP peer's uid (and that uid's groups), or None if unknown."""
    try:
        local, remote = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    family = sock.family
    try:
        uid = _uid_by_sock_diag(family, local, remote)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EPERM, errno.EACCES, errno.EPROTONOSUPPORT):
            log.warning("peer_lookup_failed", how="sock_diag", reason=exc.strerror)
            return None
        uid = _uid_by_proc(family, local, remote)
    return None if uid is None else _peer_of_uid(uid)


# -- sock_diag ------------------------------------------------------------------------------


def _uid_by_sock_diag(family: int, local: tuple[Any, ...], remote: tuple[Any, ...]) -> int | None:
    """Ask the kernel for the client's socket: its source is the peer's address, its
    destination ours. None if there is no such live socket (any more)."""
    sockid = _SOCKID.pack(
        remote[1], local[1], _packed(family, remote[0]), _packed(family, local[0])
    )
    body = (
        _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, _LIVE_STATE_MASK)
        + sockid
        + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
    )
    request = _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
    ) as nl:
        nl.settimeout(_DIAG_TIMEOUT)
        nl.sendto(request, (0, 0))
        answer = nl.recv(8192)
    return uid_from_answer(answer, family, sockid)


def uid_from_answer(answer: bytes, family: int, sockid: bytes) -> int | None:
    """The uid in sock_diag's answer about the socket `sockid` (sport, dport, src, dst
    as packed in the request), if the kernel vouches for it: the answer is about that
    very socket, of that family, in a live state, and with an inode. None otherwise;
    OSError for an error other than "no such socket"."""
    if len(answer) < _NLMSG.size:
        return None
    length, kind, _, _, _ = _NLMSG.unpack_from(answer)
    if kind == _NLMSG_ERROR:
        if len(answer) < _NLMSG.size + 4:
            return None
        (code,) = struct.unpack_from("=i", answer, _NLMSG.size)
        if -code in (errno.ENOENT, 0):
            return None
        raise OSError(-code, os.strerror(-code))
    if kind != SOCK_DIAG_BY_FAMILY or not _DIAG_MSG_SIZE <= length <= len(answer):
        return None
    answered_family, state, _, _ = _MSG_HEAD.unpack_from(answer, _NLMSG.size)
    answered_id = answer[_NLMSG.size + _MSG_HEAD.size : _NLMSG.size + _MSG_HEAD.size + _SOCKID.size]
    _, _, _, uid, inode = _MSG_TAIL.unpack_from(answer, _DIAG_MSG_SIZE - _MSG_TAIL.size)
    if (
        answered_family != family
        or state not in _LIVE_STATES
        or answered_id != sockid
        or inode == 0  # no process holds it: an orphan or a timewait entry, "uid 0"
    ):
        return None
    return int(uid)


def _packed(family: int, host: str) -> bytes:
    return ipaddress.ip_address(host.split("%", 1)[0]).packed.ljust(16, b"\0")


# -- /proc/net/tcp --------------------------------------------------------------------------


def _uid_by_proc(family: int, local: tuple[Any, ...], remote: tuple[Any, ...]) -> int | None:
    """The uid column of the line for the client's socket: its local address and port
    are the peer's, its remote ones ours. All four must match: by ports alone, a peer
    connecting from 127.0.0.N:P to our 127.0.0.1:P matched our own accepted end (owned
    by the daemon's user), and any peer could reuse a port number seen in the table on
    another loopback address. A line with no socket behind it (inode 0: an orphan or
    TIME_WAIT, listed as uid 0) or in a state other than a live connection's is
    nobody's."""
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    # "  12: LOCAL REMOTE ST ...": the pair is matched as bytes, so the table (as long
    # as any local user makes it) costs the interpreter little per line.
    pair = f": {_proc_address(family, remote)} {_proc_address(family, local)} ".encode()
    try:
        with open(table, "rb") as lines:
            for line in lines:
                if pair in line:
                    fields = line.split()
                    if len(fields) > 9 and int(fields[3], 16) in _LIVE_STATES and fields[9] != b"0":
                        return int(fields[7])
    except OSError as exc:
        log.warning("peer_lookup_failed", how="proc", reason=exc.strerror)
    return None


def _proc_address(family: int, address: tuple[Any, ...]) -> str:
    """An address as /proc/net/tcp{,6} prints it: each 32-bit word of the address in
    host byte order as 8 hex digits, a colon, the port as 4."""
    packed = ipaddress.ip_address(address[0].split("%", 1)[0]).packed
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words) + f":{address[1]:04X}"


# -- a uid's groups ------------------------------------------------------------------------

_groups: dict[int, tuple[float, Peer]] = {}


def _peer_of_uid(uid: int) -> Peer:
    now = time.monotonic()
    kept = _groups.get(uid)
    if kept is not None and kept[0] > now:
        return kept[1]
    gid, groups = -1, frozenset[int]()
    with contextlib.suppress(KeyError, OSError):
        entry = pwd.getpwuid(uid)
        gid = entry.pw_gid
        groups = frozenset(os.getgrouplist(entry.pw_name, gid))
    peer = Peer(pid=0, uid=uid, gid=gid, groups=groups)
    if len(_groups) >= _GROUPS_KEPT:
        _groups.clear()
    _groups[uid] = (now + _GROUPS_TTL, peer)
    return peer
