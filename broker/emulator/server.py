"""The emulator's HTTP/1.1 shell: h11 over trio sockets, faults, and the control API.

One address serves the auth service paths, the signature path, /graphql, and the
control API under /_emulator/ that tests and benchmarks use to inject faults, revoke
sessions, add users and read request counts.
"""

from __future__ import annotations

import json
import os
import socket as stdlib_socket
from collections.abc import Callable
from typing import Any

import h11
import trio

from .faults import Fault, Faults, FaultSpecError
from .model import AuthService, HttpRequest, HttpResponse, json_response, refusal

CONTROL_PREFIX = "/_emulator/"
MAX_BODY = 1024 * 1024
_READ_SIZE = 65536


class EmulatorServer:
    def __init__(self, service: AuthService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.faults = Faults()
        self.host = host
        self.port = port
        self._refusing_until: float | None = None
        self._reopen = trio.Event()
        self._cleared = trio.Event()
        self._listener: trio.socket.SocketType | None = None
        self._accepting = trio.CancelScope()
        self._refuse_requested: float | None = None
        #: Requests being answered right now, and the most there ever were at once.
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- listening, and refusing to --------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled; `task_status.started(url)` once connections are accepted."""
        while True:
            listener = await self._bind()
            try:
                async with trio.open_nursery() as nursery:
                    self._accepting = nursery.cancel_scope
                    if task_status is not trio.TASK_STATUS_IGNORED:
                        task_status.started(self.url)
                        task_status = trio.TASK_STATUS_IGNORED
                    await self._accept_loop(listener, nursery)
            finally:
                listener.close()
                self._listener = None
            # Refusing: the listener and every open connection are closed, so clients
            # (pooled keep-alive ones too) get ECONNREFUSED until the fault lapses.
            assert self._refusing_until is not None
            with trio.move_on_at(self._refusing_until):
                await self._reopen.wait()
            self._refusing_until = None
            self._reopen = trio.Event()

    async def _bind(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_STREAM)
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        await sock.bind((self.host, self.port))
        sock.listen(512)
        self.port = sock.getsockname()[1]
        self._listener = sock
        return sock

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(self._connection, trio.SocketStream(conn))

    def refuse(self, seconds: float) -> None:
        """Close the listening socket and every connection for `seconds` of trio time."""
        self._refusing_until = trio.current_time() + seconds
        self._accepting.cancel()

    def clear_faults(self) -> None:
        self.faults.clear()
        self._reopen.set()
        self._cleared.set()
        self._cleared = trio.Event()

    # -- one connection --------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        async with stream:
            try:
                while True:
                    request = await _read_request(conn, stream)
                    if request is None:
                        return
                    response = await self._answer(request, stream)
                    if response is None:
                        return
                    await _send_response(conn, stream, response)
                    if self._refuse_requested is not None:
                        # Asked over this very connection: refuse once it has its answer.
                        self.refuse(self._refuse_requested)
                        self._refuse_requested = None
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
            except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _answer(self, request: HttpRequest, stream: trio.SocketStream) -> HttpResponse | None:
        """The response, after any fault; None means hang up without answering."""
        if request.path.startswith(CONTROL_PREFIX):
            return self._control(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._serve(request, stream)
        finally:
            self.in_flight -= 1

    async def _serve(self, request: HttpRequest, stream: trio.SocketStream) -> HttpResponse | None:
        route = f"{request.method} {request.path}"
        fault = self.faults.pick(route, trio.current_time())
        if fault is None:
            return self.service.handle(request)
        if fault.kind == "status":
            headers = (("Retry-After", fault.retry_after),) if fault.retry_after else ()
            self.service.counts[f"fault {fault.status}"] += 1
            return json_response(fault.status, {"error": "injected fault"}, headers)
        if fault.kind == "body":
            answer = self.service.handle(request)
            assert fault.body is not None
            kept = tuple((k, v) for k, v in answer.headers if k.lower() != "content-type")
            return HttpResponse(answer.status, fault.body.encode(), kept)
        if fault.kind == "latency":
            if not fault.after:
                # The request waits in front of the service (a queue, a slow proxy). A
                # client that gave up meanwhile never reaches it, as with a real
                # server that drops aborted requests before they run.
                await trio.sleep(fault.seconds)
                if _hung_up(stream):
                    return None
            response = self.service.handle(request)
            if fault.after:
                await trio.sleep(fault.seconds)
            return response
        # A stall never answers. "after": the request took effect and the answer is
        # lost (what a crash mid-response looks like to the client); otherwise the
        # request is dropped unread. Either way the connection hangs until cleared.
        if fault.after:
            self.service.handle(request)
        await self._cleared.wait()
        return None

    # -- the control API -------------------------------------------------------------------

    def _control(self, request: HttpRequest) -> HttpResponse:
        action = self._control_actions().get((request.method, request.path[len(CONTROL_PREFIX) :]))
        if action is None:
            return refusal(404, "unknown control action")
        try:
            body: Any = json.loads(request.body) if request.body else {}
        except ValueError:
            return refusal(400, "control body is not JSON")
        if not isinstance(body, dict):
            return refusal(400, "control body must be a JSON object")
        try:
            return json_response(200, action(body))
        except (FaultSpecError, KeyError, TypeError) as exc:
            return refusal(400, f"bad control request: {exc}")

    def _control_actions(self) -> dict[tuple[str, str], Callable[[dict[str, Any]], Any]]:
        return {
            ("POST", "faults"): self._add_fault,
            ("DELETE", "faults"): self._clear_faults,
            ("POST", "revoke"): self._revoke,
            ("POST", "users"): self._add_user,
            ("POST", "inspect"): self._inspect,
            ("POST", "sessions"): self._mint_sessions,
            ("GET", "stats"): self._stats,
            ("DELETE", "stats"): self._reset_stats,
        }

    def _clear_faults(self, _: dict[str, Any]) -> dict[str, Any]:
        self.clear_faults()
        return {"faults": 0}

    def _revoke(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"revoked": self.service.revoke_user(str(body["username"]))}

    def _add_user(self, body: dict[str, Any]) -> dict[str, Any]:
        self.service.add_user(str(body["username"]), str(body["password"]))
        return {"added": body["username"]}

    def _inspect(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.service.inspect_refresh(str(body["refresh_token"]))

    def _mint_sessions(self, body: dict[str, Any]) -> dict[str, Any]:
        count = int(body.get("count", 1))
        if not 1 <= count <= 100_000:
            raise TypeError("count must be 1 to 100000")
        return {"sessions": self.service.mint_sessions(str(body["username"]), count)}

    def _stats(self, _: dict[str, Any]) -> dict[str, Any]:
        return {
            "counts": dict(self.service.counts),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }

    def _reset_stats(self, _: dict[str, Any]) -> dict[str, Any]:
        self.service.counts.clear()
        self.peak_in_flight = 0
        return {"counts": {}}

    def _add_fault(self, spec: dict[str, Any]) -> dict[str, Any]:
        fault = Fault.from_spec(spec, trio.current_time())
        if fault.kind == "refuse":
            self._refuse_requested = fault.seconds
        else:
            self.faults.add(fault)
        return {"faults": len(self.faults.rules)}


def _hung_up(stream: trio.SocketStream) -> bool:
    """Whether the peer has closed its end (EOF waiting), without consuming anything."""
    peek = stdlib_socket.socket(fileno=os.dup(stream.socket.fileno()))
    try:
        return peek.recv(1, stdlib_socket.MSG_PEEK | stdlib_socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        peek.close()


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> HttpRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_READ_SIZE)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                return None
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers}
            return HttpRequest(
                head.method.decode("ascii"), head.target.decode("latin-1"), headers, bytes(body)
            )
        else:  # ConnectionClosed, or the peer went quiet between requests
            return None


async def _send_response(
    conn: h11.Connection, stream: trio.SocketStream, response: HttpResponse
) -> None:
    headers = [
        *response.headers,
        ("Content-Length", str(len(response.body))),
        ("Server", "geins-emulator"),
    ]
    reason = b"OK" if response.status < 400 else b"Error"
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    assert data is not None
    chunks = [data]
    if response.body:
        chunks.append(conn.send(h11.Data(data=response.body)) or b"")
    chunks.append(conn.send(h11.EndOfMessage()) or b"")
    await stream.send_all(b"".join(chunks))
