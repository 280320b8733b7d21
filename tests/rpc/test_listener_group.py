"""listener.bind's socket group under a sandbox that refuses chown.

The shipped system unit filters `@privileged`, which holds chown: any chown fails with
EPERM there, even one that changes nothing. The daemon's primary group is the clients'
group (`Group=geins-broker`), so `[broker] socket_group = "geins-broker"` must be
honoured without a chown; tests/systemd runs the same under the real unit.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.rpc.listener import ListenerError, bind


@pytest.fixture
def refused_chown(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def chown(path: object, uid: int, gid: int) -> None:
        calls.append(gid)
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", chown)
    return calls


@pytest.fixture
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gb-listener-"))  # short: a socket path
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


def test_our_own_group_needs_no_chown(directory: Path, refused_chown: list[int]) -> None:
    listener = bind(directory / "merchant.sock", 0o660, os.getegid())
    try:
        info = (directory / "merchant.sock").stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, os.getegid())
        assert refused_chown == []
    finally:
        listener.close()


def test_another_group_is_chowned_and_a_refusal_says_so(
    directory: Path, refused_chown: list[int]
) -> None:
    other = os.getegid() + 1
    with pytest.raises(ListenerError, match=r"cannot set up .*merchant\.sock"):
        bind(directory / "merchant.sock", 0o660, other)
    assert refused_chown == [other]
