"""What the daemon shows of itself: the collector's view of it, the exposition, the
health verdict and the node_exporter textfile.

`Telemetry` is the `Observed` that broker/observe/metrics.py's collector reads (the
profiles live and retired, connections, ops waiting, refreshes in flight) and the
`Observable` that the `/metrics` and `/healthz` routes answer from. It reads the
daemon's parts through the roster and a getter for the server (made only once the
socket is taken), and owns nothing the daemon's lifecycle needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from broker.core.errors import Internal
from broker.core.stats import DaemonStats
from broker.observe.log import events
from broker.observe.metrics import CONTENT_TYPE, Metrics, render
from broker.observe.textfile import write_textfile
from geins_broker_client.calls import parse_profile_status
from geins_broker_client.health import Health, judge

if TYPE_CHECKING:
    from broker.daemon.config import BrokerConfig
    from broker.daemon.roster import Roster
    from broker.rpc.reactor import Server
    from broker.sessions.profile import Offload, Profile

log = events("broker.daemon")


class Telemetry:
    """The daemon as its metrics, health and textfile see it."""

    def __init__(
        self,
        roster: Roster,
        stats: DaemonStats,
        *,
        config: Callable[[], BrokerConfig],
        server: Callable[[], Server | None],
        offload: Offload,
    ) -> None:
        self.stats = stats
        self._roster = roster
        self._config = config
        self._server = server
        self._offload = offload
        self._started_at = roster.wall.now()
        self._textfile_error: str | None = None
        self._render_flight: _Flight | None = None
        self.metrics = Metrics(self)
        if (fleet := roster.fleet) is not None:
            # Imported only in fleet mode, so a single host never loads Redis.
            from broker.fleet.gauges import source

            self.metrics.add_source(source(fleet, lambda: self.per_profile))

    def mark_started(self) -> None:
        """The daemon's start time is when it began serving, not when it was built."""
        self._started_at = self._roster.wall.now()

    # -- what metrics.Metrics reads (its `Observed` protocol) ---------------------------

    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def per_profile(self) -> bool:
        return self._config().metrics.per_profile

    def live_profiles(self) -> Iterable[Profile]:
        return self._roster.profiles.values()

    def retired_profiles(self) -> Iterable[Profile]:
        return self._roster.retired.values()

    def connection_count(self) -> int:
        server = self._server()
        return server.connections if server else 0

    def waiting_ops(self) -> Mapping[str, int]:
        server = self._server()
        return server.waiting_by_op if server else {}

    def refreshes_in_flight(self) -> int:
        limiter = self._roster.limiter
        return int(limiter.borrowed_tokens) if limiter else 0

    # -- what the routes and the `metrics` op answer ------------------------------------

    async def render_metrics(self) -> bytes:
        """The exposition: numbers copied here, formatted off the event loop.

        Single flight: scrapes that arrive while one renders share its result. A flood
        of scrapes (`GET /metrics` is open to every local user of the TCP listener)
        then costs one render at a time, and never takes the worker threads that
        session writes need. The render runs shielded: the scrape that started it may
        hang up, the others still get their answer.
        """
        flight = self._render_flight
        if flight is not None:
            await flight.done.wait()
        else:
            flight = self._render_flight = _Flight()
            try:
                with trio.CancelScope(shield=True):
                    snapshot = await self.metrics.snapshot_async()
                    flight.result = await self._offload(render, snapshot)
            finally:
                self._render_flight = None
                flight.done.set()
        if flight.result is None:
            raise Internal("rendering the metrics failed; see the daemon's log")
        return flight.result

    async def metrics_text(self) -> tuple[str, str]:
        """The `metrics` op's answer: the exposition and its content type."""
        return (await self.render_metrics()).decode(), CONTENT_TYPE

    def health(self) -> Health:
        """The verdict `GET /healthz` answers with (`.http_status`, `.line()`); the same
        one `geins-broker status --check` reaches from the status op."""
        statuses = [parse_profile_status(p.status()) for p in self._roster.profiles.values()]
        return judge(statuses, self._roster.wall.now())

    # -- the textfile -------------------------------------------------------------------

    async def run_textfile(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Write the node_exporter textfile now (started: once the unit is up, so is
        its textfile), then every `textfile_interval` seconds (both read afresh each
        time, so a reload may start, move or stop it)."""
        if (path := self._config().metrics.textfile) is not None:
            await self._write_textfile(path)
        task_status.started()
        while True:
            await trio.sleep(self._config().metrics.textfile_interval)
            if (path := self._config().metrics.textfile) is not None:
                await self._write_textfile(path)

    async def _write_textfile(self, path: Path) -> None:
        try:
            text, access = await self.render_metrics(), self._config().metrics.textfile_access
            await self._offload(write_textfile, path, text, access)
        except OSError as exc:
            self.stats.textfile_failures += 1
            reason = exc.strerror or str(exc)
            if reason != self._textfile_error:  # once per kind of failure, not every time
                log.error("textfile_write_failed", path=path, reason=reason)
            self._textfile_error = reason
            return
        if self._textfile_error is not None:
            log.info("textfile_write_recovered", path=path)
            self._textfile_error = None


class _Flight:
    """One render of the metrics, and everyone waiting for it."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: bytes | None = None
