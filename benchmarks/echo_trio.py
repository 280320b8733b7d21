"""Bare trio baseline: answer every length-prefixed frame with one fixed small frame.

This is the floor for any trio daemon on this socket protocol: no decoding, no
dispatch, just trio.SocketStream receive/parse/send.  The default reply is the 9-byte
frame ssh-agent sends for an empty identities list (type 12, count 0), so the
comparison with ``ssh-agent`` is byte-for-byte the same traffic.

trio has no ``serve_unix``: bind an AF_UNIX trio.socket, listen, wrap it in
trio.SocketListener and hand it to trio.serve_listeners.

    python benchmarks/echo_trio.py --socket /tmp/echo.sock
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable

import trio

DEFAULT_REPLY = bytes.fromhex("00000005" + "0c00000000")  # SSH2_AGENT_IDENTITIES_ANSWER, 0


def make_handler(reply: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                frames = 0
                while len(buf) >= 4:
                    need = 4 + int.from_bytes(buf[:4], "big")
                    if len(buf) < need:
                        break
                    del buf[:need]
                    frames += 1
                if frames:
                    await stream.send_all(reply * frames)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with contextlib.suppress(trio.TooSlowError):
                await stream.aclose()

    return handle


async def _cancel_on_sigterm(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()
            return


async def serve(path: str, reply: bytes = DEFAULT_REPLY, backlog: int = 128) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_sigterm, nursery.cancel_scope)
            await nursery.start(
                trio.serve_listeners, make_handler(reply), [trio.SocketListener(sock)]
            )
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description="trio length-prefixed fixed-reply server")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--reply-hex", default=DEFAULT_REPLY.hex(), help="reply frame, hex")
    ap.add_argument("--backlog", type=int, default=128, help="128 = ssh-agent's backlog")
    args = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, args.socket, bytes.fromhex(args.reply_hex), args.backlog)


if __name__ == "__main__":
    main()
