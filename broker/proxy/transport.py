"""Bytes to and from an upstream socket on the reactor: in clear, or through TLS.

Both keep what the kernel did not take (`pending`) and say whether it is all out;
`receive` returns b"" at the end of input and raises BlockingIOError when nothing is
there yet. TLS runs in memory (ssl.SSLObject over two MemoryBIOs), so the socket stays
non-blocking and only the reactor reads it; `receive` decrypts everything one recv
brought, so no plaintext waits inside the TLS layer while epoll sees nothing to read.
"""

from __future__ import annotations

import socket
import ssl
from typing import Final

_READ: Final = 65536


def _send_pending(sock: socket.socket, pending: bytearray) -> bool:
    """Send as much of `pending` as the socket takes now, dropping what was sent; True
    once nothing is left."""
    if pending:
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            return False
        del pending[:sent]
    return not pending


class Plain:
    __slots__ = ("_sock", "pending")

    handshaking = False

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.pending = bytearray()

    def write(self, data: bytes | bytearray) -> bool:
        """Send `data` (behind what is pending); True when nothing is left pending."""
        if self.pending:
            self.pending += data
            return self.flush()
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.pending += memoryview(data)[sent:]
            return False
        return True

    def flush(self) -> bool:
        return _send_pending(self._sock, self.pending)

    def receive(self, size: int) -> bytes:
        return self._sock.recv(size)


class Tls:
    __slots__ = ("_incoming", "_object", "_outgoing", "_sock", "handshaking", "pending")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._object = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        self.handshaking = True
        self.pending = bytearray()

    def handshake(self) -> bool:
        """One step of the handshake (on each event while `handshaking`); True once done.
        Raises ssl.SSLError (a certificate that does not verify) or OSError."""
        try:
            self._object.do_handshake()
        except ssl.SSLWantReadError:
            self._take_outgoing()
            self.flush()
            try:
                data = self._sock.recv(_READ)
            except BlockingIOError:
                return False
            if not data:
                raise ConnectionResetError("closed during the TLS handshake") from None
            self._incoming.write(data)
            return self.handshake()
        self.handshaking = False
        self._take_outgoing()
        self.flush()
        return True

    def write(self, data: bytes | bytearray) -> bool:
        self._object.write(data)
        self._take_outgoing()
        return self.flush()

    def flush(self) -> bool:
        return _send_pending(self._sock, self.pending)

    def receive(self, size: int) -> bytes:
        data = self._sock.recv(size)  # BlockingIOError: nothing yet
        if not data:
            self._incoming.write_eof()
        else:
            self._incoming.write(data)
        plain = bytearray()
        while True:
            try:
                piece = self._object.read(_READ)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            if not piece:
                break
            plain += piece
        self._take_outgoing()  # e.g. an answer to a key update
        self.flush()
        if not plain and not data:
            return b""
        if not plain:
            raise BlockingIOError  # a partial record: more is coming
        return bytes(plain)

    def _take_outgoing(self) -> None:
        if self._outgoing.pending:
            self.pending += self._outgoing.read()


Transport = Plain | Tls
