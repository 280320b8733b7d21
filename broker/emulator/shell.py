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

import trio

from broker.emulator.model.faults import Fault, Faults, FaultSpecError
from broker.emulator.model.service import AuthService
from broker.emulator.model.values import HttpRequest, HttpResponse, json_response, refusal
from broker.http.server import Exchange, HttpLimits, HttpServer

CONTROL_PREFIX = "/_emulator/"
#: Room for the proxy's streamed (larger than 1 MiB) request bodies.
MAX_BODY = 16 * 1024 * 1024
#: A test fixture, not a service: no timeouts (faults stall on purpose), and room for the
#: thousands of connections the load benchmarks open.
EMULATOR_LIMITS = HttpLimits(
    max_connections=100_000,
    max_header_size=1024 * 1024,
    max_body_size=MAX_BODY,
    header_timeout=float("inf"),
    idle_timeout=float("inf"),
)


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
        self._truncating: HttpRequest | None = None
        self.http = HttpServer(self._handle, EMULATOR_LIMITS, name="emulator")

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
                    await self.http.serve(listener)
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

    def refuse(self, seconds: float) -> None:
        """Close the listening socket and every connection for `seconds` of trio time."""
        self._refusing_until = trio.current_time() + seconds
        self._accepting.cancel()

    def clear_faults(self) -> None:
        self.faults.clear()
        self._reopen.set()
        self._cleared.set()
        self._cleared = trio.Event()

    # -- one request -----------------------------------------------------------------------

    async def _handle(self, exchange: Exchange) -> None:
        body = await exchange.read_body()
        request = HttpRequest(exchange.method, exchange.target, dict(exchange.headers), body)
        response = await self._answer(request, exchange.stream)
        if response is None:
            return  # hang up without answering
        headers = [*response.headers, ("Server", "geins-emulator")]
        if self._truncating is not None and self._truncating is request:
            # "Close mid-body": the head promises the whole body, half of it comes.
            self._truncating = None
            headers.append(("Content-Length", str(len(response.body))))
            await exchange.start(response.status, headers)
            await exchange.send(response.body[: len(response.body) // 2])
            return
        await exchange.respond(response.status, headers, response.body)
        if self._refuse_requested is not None:
            # Asked over this very connection: refuse once it has its answer.
            self.refuse(self._refuse_requested)
            self._refuse_requested = None

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
        if fault.kind in ("truncate", "body"):
            return self._altered(fault, request)
        if fault.kind == "status":
            headers = (("Retry-After", fault.retry_after),) if fault.retry_after else ()
            self.service.counts[f"fault {fault.status}"] += 1
            return json_response(fault.status, {"error": "injected fault"}, headers)
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

    def _altered(self, fault: Fault, request: HttpRequest) -> HttpResponse:
        """The service acts; its answer is cut mid-body ("truncate") or has its body
        replaced, headers kept ("body": a proxy's error page over a real answer)."""
        if fault.kind == "truncate":
            self._truncating = request
            return self.service.handle(request)
        answer = self.service.handle(request)
        assert fault.body is not None
        kept = tuple((k, v) for k, v in answer.headers if k.lower() != "content-type")
        return HttpResponse(answer.status, fault.body.encode(), kept)

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
            ("POST", "user_sessions"): self._user_sessions,
            ("POST", "users"): self._add_user,
            ("POST", "inspect"): self._inspect,
            ("POST", "sessions"): self._mint_sessions,
            ("POST", "orders"): self._add_orders,
            ("GET", "stats"): self._stats,
            ("DELETE", "stats"): self._reset_stats,
        }

    def _clear_faults(self, _: dict[str, Any]) -> dict[str, Any]:
        self.clear_faults()
        return {"faults": 0}

    def _revoke(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"revoked": self.service.revoke_user(str(body["username"]))}

    def _user_sessions(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.service.sessions_of(str(body["username"]))

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

    def _add_orders(self, body: dict[str, Any]) -> dict[str, Any]:
        count, note_size = int(body.get("count", 1)), int(body.get("note_size", 0))
        if not 0 <= count <= 100_000 or not 0 <= note_size <= 1024 * 1024:
            raise TypeError("count must be 0 to 100000 and note_size 0 to 1048576")
        return {"orders": self.service.add_orders(str(body["username"]), count, note_size)}

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
