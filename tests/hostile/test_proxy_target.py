"""Steering the proxy's upstream URL with the request target, over a real socket.

The target is appended to the profile's `merchant_api_url`, never resolved. A base
path there (`https://gateway/geins`) is a boundary the configuration draws: a dot
segment (`..`, `.`, raw or percent-encoded, after `/` or the backslash some servers
read as one) would be resolved by the upstream and step out of it with the profile's
bearer. Such a target is refused before anything is sent; an absolute-form target,
CONNECT and `*` are refused too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from broker.policy.headers import has_dot_segment
from tests.hostile.test_proxy_framing import _broker, _exchange

STEERING = (
    b"/../admin",
    b"/graphql/..",
    b"/a/./graphql",
    b"/%2e%2e/admin",
    b"/%2E./admin",
    b"/a\\..\\admin",
    b"/a%5c..%5cadmin",
    b"/..%2fadmin",
    b"/..?q=1",
)


def test_dot_segments_are_found_in_the_path_only() -> None:
    for target in STEERING:
        assert has_dot_segment(target), target
    for target in (b"/graphql", b"/a..b/c.d", b"/.well-known/x", b"/graphql?x=/../y", b"/..."):
        assert not has_dot_segment(target), target


@pytest.mark.parametrize("target", [*STEERING, b"//evil.example/../x"])
async def test_a_target_that_steps_out_of_the_base_path_is_refused(
    nursery: trio.Nursery, short_tmp: Path, target: bytes
) -> None:
    broker = await _broker(nursery, short_tmp)
    before = len(broker.emulator.service.recent)
    answer = await _exchange(
        broker, b"GET " + target + b" HTTP/1.1\r\nHost: geins\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400 "), (target, answer[:300])
    assert [r.path for r in list(broker.emulator.service.recent)[before:]] == []


@pytest.mark.parametrize(
    "line", [b"CONNECT geins:443 HTTP/1.1", b"OPTIONS * HTTP/1.1", b"GET http://evil/x HTTP/1.1"]
)
async def test_a_target_that_is_not_a_path_is_refused(
    nursery: trio.Nursery, short_tmp: Path, line: bytes
) -> None:
    broker = await _broker(nursery, short_tmp)
    before = len(broker.emulator.service.recent)
    answer = await _exchange(broker, line + b"\r\nHost: geins\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), (line, answer[:300])
    assert [r.path for r in list(broker.emulator.service.recent)[before:]] == []
