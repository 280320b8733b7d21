"""The proxy's memos of ready-made heads against peers that fill them, over real sockets.

The proxy keeps a buffered request's header lines for Geins per profile (by the
caller's headers) and the heads of Geins' answers (by Geins' headers), each memo at most
64 entries. What an entry holds is the key: one tuple and two bytes objects per header,
about 120 bytes however short the header is. A caller (for the request memo) or a lying
upstream (for the answer memo) that sends hundreds of one-byte headers must not make
one entry hold hundreds of KiB: each entry stays within `_ENTRY_BUDGET`, so a memo
within 64 of them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import trio

from broker.core.clock import SystemClock
from broker.emulator.app import Emulator
from broker.proxy.handler import ProxyApp
from tests.hostile.test_proxy_framing import GET_USER, HEAD, _exchange, _lied_to
from tests.support import Broker, start_broker

#: What one memo entry (its key and its head) may hold, in bytes.
_ENTRY_BUDGET = 16 * 1024
#: Header lines of one byte's name and no value: 5 bytes each on the wire.
_TINY = b"".join(b"%c:\r\n" % (97 + i % 26) for i in range(390))


def _held(value: Any) -> int:
    """Bytes `value` holds: a tuple with everything in it (a memo's key or value)."""
    if isinstance(value, tuple):
        return sys.getsizeof(value) + sum(_held(item) for item in value)
    return sys.getsizeof(value)


def _app(broker: Broker) -> ProxyApp:
    proxy = broker.daemon.proxy
    assert proxy is not None
    return proxy.app


def _post(extra: bytes = b"") -> bytes:
    body = json.dumps(GET_USER).encode()
    return HEAD + extra + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_a_caller_with_many_tiny_headers_does_not_fill_the_request_memo(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    """390 one-byte headers are under 2 KiB as received, yet a key of ~30 KiB."""
    emulator = Emulator(clock=time.time, token_ttl=900.0)
    await emulator.start(nursery)
    broker = await start_broker(nursery, emulator, SystemClock(), short_tmp)
    await broker.login()
    plain = await _exchange(broker, _post())
    assert plain.startswith(b"HTTP/1.1 200 "), plain[:300]
    tiny = await _exchange(broker, _post(_TINY))
    assert tiny.startswith(b"HTTP/1.1 200 "), tiny[:300]
    memo = _app(broker).ready["default"].fields
    assert len(memo) >= 1  # the plain request's lines are kept
    held = [_held(key) + _held(made) for key, made in memo.items()]
    assert [size for size in held if size > _ENTRY_BUDGET] == []


async def test_a_lying_upstream_with_many_tiny_headers_does_not_fill_the_answer_memo(
    nursery: trio.Nursery, short_tmp: Path
) -> None:
    """An answer of 2000 one-byte headers (under 2 KiB of names and values, a 10 KiB
    head) reaches the caller whole, and is not kept."""
    tiny = b"".join(b"%c:\r\n" % (97 + i % 26) for i in range(2000))
    body = b'{"data":{"getUser":{"email":"a@example.com"}}}'
    lie = b"HTTP/1.1 200 OK\r\n" + tiny + b"content-length: %d\r\n\r\n%s" % (len(body), body)
    broker = await _lied_to(nursery, short_tmp, lie)
    answer = await _exchange(broker, _post())
    head, _, got = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert head.count(b"\r\n") >= 2000 and got == body
    held = [_held(key) + _held(made) for key, made in _app(broker).heads.items()]
    assert [size for size in held if size > _ENTRY_BUDGET] == []
