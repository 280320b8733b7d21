"""Who is calling over loopback TCP: the kernel's answer, by both lookups, for another uid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from broker.proxy import peers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")
NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]


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
        client = subprocess.Popen([*AS_NOBODY, sys.executable, "-c", script], stdin=subprocess.PIPE)
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
