"""Who is calling over loopback TCP: the kernel's answer, by both lookups, for another uid."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from broker.proxy import peers
from tests.support import NOBODY, python_as

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")


def connected_as_nobody(family: int, host: str) -> Iterator[socket.socket]:
    """The accepted end of a connection made by a process running as uid 65534."""
    with socket.socket(family) as server:
        server.bind((host, 0))
        server.listen()
        port = server.getsockname()[1]
        script = (
            f"import socket,sys; s=socket.socket({int(family)}); s.connect(({host!r},{port}));"
            " sys.stdin.read()"
        )
        client = subprocess.Popen(python_as(NOBODY, "-c", script), stdin=subprocess.PIPE)
        try:
            accepted, _ = server.accept()
            with accepted:
                yield accepted
        finally:
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=10)


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_both_lookups_find_the_callers_uid(family: int, host: str) -> None:
    for accepted in connected_as_nobody(family, host):
        local, remote = accepted.getsockname(), accepted.getpeername()
        assert peers._uid_by_sock_diag(family, local, remote) == NOBODY
        assert peers._uid_by_proc(family, local, remote) == NOBODY
        peer = peers.tcp_peer(accepted)
        assert peer is not None
        assert (peer.uid, peer.gid) == (NOBODY, NOBODY)


def test_without_netlink_the_proc_lookup_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_netlink(*args: object) -> None:
        raise OSError(97, "Address family not supported by protocol")  # EAFNOSUPPORT

    monkeypatch.setattr(peers, "_uid_by_sock_diag", no_netlink)
    for accepted in connected_as_nobody(socket.AF_INET, "127.0.0.1"):
        peer = peers.tcp_peer(accepted)
        assert peer is not None
        assert peer.uid == NOBODY


def test_a_connection_nobody_owns_any_more_is_unknown() -> None:
    """A 4-tuple with no socket behind it (the client is gone) is nobody's."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        local = server.getsockname()
        assert peers._uid_by_sock_diag(socket.AF_INET, local, ("127.0.0.1", 1)) is None
        assert peers._uid_by_proc(socket.AF_INET, local, ("127.0.0.1", 1)) is None


# -- the answer's parsing, on canned bytes --------------------------------------------------

_LOOPBACK = bytes([127, 0, 0, 1]).ljust(16, b"\0")
_ASKED = peers._SOCKID.pack(40000, 8080, _LOOPBACK, _LOOPBACK)


def diag_answer(
    *,
    state: int = 1,
    uid: int = NOBODY,
    inode: int = 4242,
    sockid: bytes = _ASKED,
    family: int = socket.AF_INET,
    kind: int = peers.SOCK_DIAG_BY_FAMILY,
) -> bytes:
    """An inet_diag_msg as the kernel writes it, in a netlink message."""
    body = (
        peers._MSG_HEAD.pack(family, state, 0, 0)
        + sockid
        + peers._SOCKID_TAIL.pack(0, 7, 0)
        + peers._MSG_TAIL.pack(0, 0, 0, uid, inode)
    )
    return peers._NLMSG.pack(peers._NLMSG.size + len(body), kind, 0, 1, 0) + body


@pytest.mark.parametrize("state", [1, 2, 3], ids=["ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"])
def test_a_live_socket_with_an_inode_is_believed(state: int) -> None:
    answer = diag_answer(state=state)
    assert peers.uid_from_answer(answer, socket.AF_INET, _ASKED) == NOBODY


@pytest.mark.parametrize(
    "answer",
    [
        # An orphaned client socket turned timewait: uid 0, inode 0 (the attack).
        diag_answer(state=6, uid=0, inode=0),
        # The timewait entry of an orphan closed in FIN_WAIT2 keeps that state's number.
        diag_answer(state=3, uid=0, inode=0),
        # An orphan that is still a full socket: its uid is kept, its inode is not.
        diag_answer(state=1, uid=0, inode=0),
        # A held socket in a state no live connection's client end is in (CLOSE).
        diag_answer(state=7, uid=0),
        # A live socket, but not the one asked for (another port, another family).
        diag_answer(uid=0, sockid=_ASKED[:-1] + b"\x01"),
        diag_answer(uid=0, family=socket.AF_INET6),
        # Not an inet_diag answer, or cut short.
        diag_answer(uid=0, kind=peers.SOCK_DIAG_BY_FAMILY + 1),
        diag_answer(uid=0)[:40],
    ],
    ids=[
        "timewait",
        "fin_wait2_timewait",
        "orphan",
        "close",
        "other_id",
        "family",
        "kind",
        "short",
    ],
)
def test_anything_but_a_held_live_socket_asked_for_is_nobody(answer: bytes) -> None:
    assert peers.uid_from_answer(answer, socket.AF_INET, _ASKED) is None
