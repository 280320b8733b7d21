"""From a decoded request to its answer: the token hot path, immediate ops, and the ops
that wait, each run as a task that answers through its connection when done.

The reactor hands every request here and writes what comes back; a waiting op writes
its answer itself through `Outbox` (the reactor), between reactor rounds.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from broker.core.errors import (
    BadRequest,
    BrokerFault,
    Busy,
    Forbidden,
    Internal,
    RateLimited,
    UnknownOp,
)
from broker.core.stats import ServerStats
from broker.observe.log import events
from broker.policy.schemas import SCHEMAS, arguments
from geins_broker_client.protocol import DEFAULT_PROFILE, Code, Op, encode, error_body

if TYPE_CHECKING:
    from broker.core.clock import WallClock
    from broker.rpc.admission import Admission
    from broker.rpc.connection import Connection
    from broker.rpc.ops import Api
    from geins_broker_client.protocol import Message

log = events("broker.server")

_TOKEN: Final = Op.TOKEN
_SESSION_TOKEN: Final = Op.SESSION_TOKEN
_NUMBERS: Final = frozenset({int, float})


def error_frame(request_id: int | None, exc: BrokerFault) -> bytes:
    retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
    return encode({"id": request_id, **error_body(exc.code, str(exc), retry_after)})


class Outbox(Protocol):
    """What a waiting op needs of the reactor: a way to answer, and to say when its
    connection's idle clock restarts."""

    def write(self, conn: Connection, data: bytes) -> None: ...

    def check_timeouts_by(self, when: float) -> None: ...


class Dispatcher:
    """Answers requests; owns the waiting ops' tasks and their counts."""

    def __init__(self, api: Api, admission: Admission, wall: WallClock, stats: ServerStats) -> None:
        self.api = api
        self.stats = stats
        self._admission = admission
        self._profiles = api.profiles  # the daemon's live table, changed in place on reload
        self._session_ops = api.session_ops
        #: Each configured app's key in a connection's ACL cache, made once: "app:" and
        #: its name (no profile is named so: a profile name has no ':').
        self._app_keys: dict[str, str] = {}
        self._now = wall.now
        self._outbox: Outbox | None = None
        self._nursery: trio.Nursery | None = None
        #: Waiting ops in flight by op (watches included), for the metrics.
        self.waiting_by_op: dict[str, int] = {}
        #: Waiting ops in flight, watches excluded: what a shutdown waits for.
        self.in_flight = 0
        self._drained = trio.Event()

    def start(self, outbox: Outbox, nursery: trio.Nursery) -> None:
        """Where answers go and where waiting ops run, once the reactor serves."""
        self._outbox = outbox
        self._nursery = nursery

    async def drained(self) -> None:
        """Return once no waiting op (other than watches) is in flight."""
        while self.in_flight:
            self._drained = trio.Event()
            await self._drained.wait()

    def dispatch(self, conn: Connection, message: Message) -> bytes | None:  # noqa: PLR0911, PLR0912, PLR0915
        """The answer to one request, or None when a task will answer it later."""
        request_id = message.get("id")
        if type(request_id) is not int:
            return self.error_frame(None, BadRequest("field 'id' must be an integer"))
        op = message.get("op")
        try:
            if op == _TOKEN:
                # The hot path, written out here rather than called: the token a
                # profile holds, in its pre-encoded answer. Anything unusual (an
                # unknown profile, a bad min_valid, a token that will not do) falls
                # through to the long way: validation, or waiting for a refresh.
                name = message.get("profile", DEFAULT_PROFILE)
                min_valid = message.get("min_valid", 0)
                profile = self._profiles.get(name) if type(name) is str else None
                # (not >= also catches NaN)
                if profile is not None and type(min_valid) in _NUMBERS and min_valid >= 0:
                    cached = conn.acl_cache.get(name)
                    if cached is not None and cached[0] is profile.config:
                        allowed = cached[1]
                    else:
                        allowed = self.api.may_read(conn.peer, profile)
                        conn.acl_cache[name] = (profile.config, allowed)
                    if not allowed:
                        profile.token_results.inc(Code.FORBIDDEN)
                        raise Forbidden(f"uid {conn.peer.uid} may not read profile {name!r}")
                    frame = profile.token_frame(request_id, min_valid, self._now())
                    if frame is not None:
                        return frame
            elif op == _SESSION_TOKEN:
                # `token`'s hot path for a customer session held in memory, written out
                # here for the same reason: no task, no validation beyond the types read
                # here. Anything else goes the long way (schemas, then session_ops.py),
                # which also gives every refusal but `forbidden` its answer, so a
                # refusal costs the same whichever way it came.
                ops = self._session_ops
                customers = ops.customers
                name, handle = message.get("app"), message.get("handle")
                min_valid = message.get("min_valid", 0)
                app = ops.apps.get(name) if type(name) is str else None
                if (
                    app is not None
                    and customers is not None
                    and type(handle) is str
                    and type(min_valid) in _NUMBERS
                    and min_valid >= 0  # (not >= also catches NaN)
                    and name in customers.apps
                ):
                    cache_key = self._app_keys.get(name)
                    if cache_key is None:
                        cache_key = self._app_keys[name] = "app:" + name
                    cached = conn.acl_cache.get(cache_key)
                    if cached is not None and cached[0] is app:
                        allowed = cached[1]
                    else:
                        allowed = ops.may_use(conn.peer, app)
                        conn.acl_cache[cache_key] = (app, allowed)
                    if not allowed:
                        raise Forbidden(f"uid {conn.peer.uid} may not use app {name!r}")
                    frame = customers.token_frame(request_id, name, handle, min_valid, self._now())
                    if frame is not None:
                        return frame
            if not isinstance(op, str):
                raise BadRequest("field 'op' must be a string")
            if op not in SCHEMAS:
                raise UnknownOp(f"unknown op {op!r}; this daemon speaks {', '.join(Op.ALL)}")
            args = arguments(op, message)
            immediate = self.api.immediate.get(op)
            if immediate is not None:
                return encode({"id": request_id, "ok": True, **immediate(conn.peer, args)})
            self._start_waiting(conn, request_id, op, args)
            return None
        except BrokerFault as exc:
            return self.error_frame(request_id, exc)
        except Exception:
            log.exception("internal_error", op=op, peer_uid=conn.peer.uid)
            return self.error_frame(request_id, Internal("internal error; see the daemon's log"))

    def error_frame(self, request_id: int | None, exc: BrokerFault) -> bytes:
        """An error answer, counted by its code (a fixed set: a bounded label)."""
        self.stats.errors.inc(exc.code)
        return error_frame(request_id, exc)

    def _start_waiting(
        self, conn: Connection, request_id: int, op: str, args: dict[str, Any]
    ) -> None:
        max_waiting = self._admission.limits.max_waiting
        if conn.waiting >= max_waiting:
            raise Busy(f"more than {max_waiting} requests waiting on this connection")
        assert self._nursery is not None
        self.waiting_by_op[op] = self.waiting_by_op.get(op, 0) + 1
        self.stats.waited.inc(op)
        if op == Op.WATCH:
            work = self._watch(conn, request_id, args)
        else:
            work = self._answer_later(conn, request_id, self.api.waiting[op](conn.peer, args))
            self.in_flight += 1
        conn.waiting += 1
        self._nursery.start_soon(self._run_waiting, conn, work, op, name=f"op:{op}")

    async def _run_waiting(self, conn: Connection, work: Awaitable[None], op: str) -> None:
        scope = trio.CancelScope()
        conn.tasks.add(scope)
        try:
            with scope:
                await work
        finally:
            conn.tasks.discard(scope)
            conn.waiting -= 1
            self.waiting_by_op[op] -= 1
            conn.last_active = trio.current_time()
            if op != Op.WATCH:
                self.in_flight -= 1
                if not self.in_flight:
                    self._drained.set()
            self._write_outbox().check_timeouts_by(
                conn.last_active + self._admission.idle_limit(conn.stranger)
            )

    async def _answer_later(
        self, conn: Connection, request_id: int, result: Awaitable[dict[str, Any]]
    ) -> None:
        try:
            frame = encode({"id": request_id, "ok": True, **(await result)})
        except BrokerFault as exc:
            frame = self.error_frame(request_id, exc)
        except Exception:
            log.exception("internal_error", peer_uid=conn.peer.uid)
            frame = self.error_frame(request_id, Internal("internal error; see the daemon's log"))
        self._write_outbox().write(conn, frame)

    async def _watch(self, conn: Connection, request_id: int, args: dict[str, Any]) -> None:
        outbox = self._write_outbox()

        async def emit(event: dict[str, Any]) -> None:
            outbox.write(conn, encode({"id": request_id, "ok": True, **event}))

        try:
            await self.api.watch(conn.peer, args, emit)
        except BrokerFault as exc:
            outbox.write(conn, self.error_frame(request_id, exc))

    def _write_outbox(self) -> Outbox:
        assert self._outbox is not None  # set by start(), before any op can wait
        return self._outbox
