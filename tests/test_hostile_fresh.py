"""The fresh hostile pass after issue 9: attacks by another local uid, each a test that
failed before its fix (docs/security.md lists them)."""

from __future__ import annotations

import os
import socket
import subprocess
import contextlib
from collections.abc import Iterator

import pytest

from broker.proxy import peers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")
NOBODY = 65534
AS_NOBODY = ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
PYTHON = "/usr/bin/python3"


def _no_netlink(*args: object) -> None:
    raise OSError(97, "Address family not supported by protocol")  # EAFNOSUPPORT


@contextlib.contextmanager
def accepted_from_sources(sources: list[str]) -> Iterator[list[socket.socket]]:
    """A listener on 127.0.0.1; uid 65534 connects to it once from each source address,
    each time from the listener's own port number."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        script = (
            "import socket,sys\n"
            "held=[]\n"
            f"for host in {sources!r}:\n"
            "    s=socket.socket()\n"
            f"    s.bind((host, {port}))\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "    held.append(s)\n"
            "sys.stdin.read()\n"
        )
        client = subprocess.Popen(
            [*AS_NOBODY, PYTHON, "-c", script], stdin=subprocess.PIPE
        )
        accepted: list[socket.socket] = []
        try:
            server.settimeout(10)
            for _ in sources:
                accepted.append(server.accept()[0])
            yield accepted
        finally:
            for sock in accepted:
                sock.close()
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=10)


def test_a_source_port_equal_to_the_listeners_is_not_the_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without netlink (the shipped units), /proc/net/tcp was searched by ports alone.
    A stranger who connects from 127.0.0.N:P to the proxy's 127.0.0.1:P matches two
    lines: its own, and the daemon's accepted end (local port P, remote port P), owned
    by the daemon's user, an admin. Whichever the kernel lists first won, so a few
    source addresses were enough to be taken for the daemon and be served any profile."""
    monkeypatch.setattr(peers, "_uid_by_sock_diag", _no_netlink)
    sources = [f"127.0.0.{n}" for n in range(2, 6)]
    uids = []
    for _ in range(10):  # which line comes first depends on the port: a few listeners
        with accepted_from_sources(sources) as accepted:
            for sock in accepted:
                peer = peers.tcp_peer(sock)
                uids.append(None if peer is None else peer.uid)
    assert uids == [NOBODY] * len(uids)
