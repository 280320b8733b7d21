"""`geins-broker serve`: config, store, profiles, server, signals and systemd, wired.

Start-up: read the config, open and lock the state directory (refusing one that is a
link, another uid's, or writable by others: exit 2), restore every saved session
(overdue refreshes spread out, at most `max_concurrent_refreshes` at once), take the
socket (from systemd, or bind it), start serving, then tell systemd READY=1.

SIGTERM/SIGINT: STOPPING=1, stop accepting, give requests in flight `shutdown_grace`
seconds, finish pending writes, remove the socket, exit 0. SIGHUP: reload the config,
adding and removing profiles without touching the others' sessions.

This module is the lifecycle; the profile table and what a reload does to it are
`roster.py`, what the metrics, health and textfile read of the daemon `telemetry.py`.
"""

from __future__ import annotations

import functools
import gc
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final

import httpx
import trio

from broker import __version__
from broker.core.clock import OffsetClock, SystemClock, WallClock
from broker.core.errors import StateDirError, StoreError
from broker.core.sealing import Keyring
from broker.core.stats import DaemonStats
from broker.customers import gauges as customer_gauges
from broker.customers.contract import SessionStore
from broker.customers.manager import CustomerSessions
from broker.customers.store import CustomerStore
from broker.daemon import fault_injection
from broker.daemon.config import BrokerConfig, ConfigError, find_config, load
from broker.daemon.hardening import keep_memory_private
from broker.daemon.notify import Notifier
from broker.daemon.roster import Roster, abandonable, read_config
from broker.daemon.telemetry import Telemetry
from broker.observe import log as logging_setup
from broker.observe.log import events
from broker.proxy.service import Proxy
from broker.rpc.listener import Listener, ListenerError, UnsafeDirectory, bind, from_systemd
from broker.rpc.ops import Api
from broker.rpc.reactor import Server
from broker.sessions.geins_client import GeinsClient
from broker.sessions.profile import Offload, Profile
from broker.storage.keys import load_keyring
from broker.storage.store import Store

if TYPE_CHECKING:
    from broker.fleet.coordinator import Fleet

log = events("broker.daemon")

#: STATUS= lines to systemd at most this often.
_STATUS_INTERVAL: Final = 1.0


class Daemon:
    """One daemon's life: start, serve, signals and reload, drain, stop.

    Over the house's ~15 attributes, on purpose: it is the one place that wires the
    shells (the roster, telemetry, the broker socket, the proxy, customer sessions) and
    orders their start and their drain, so it holds a reference to each. What any of
    them does lives in its own class (`Roster`, `Telemetry`, `Server`, `Proxy`,
    `CustomerSessions`); splitting the wiring itself would scatter the one order in
    which they start and stop.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        wall: WallClock | None = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        notifier: Notifier | None = None,
        offload: Offload = trio.to_thread.run_sync,
        faults: frozenset[str] = frozenset(),
        keyring: Keyring | None = None,
        key_source: str = "given",
    ) -> None:
        self.config = config
        #: Test-only faults (broker/daemon/fault_injection.py); empty in production.
        self.faults = faults
        if keyring is None:
            keyring, key_source = load_keyring(config)
        self.wall = wall or SystemClock()
        self.notifier = notifier or Notifier()
        store = Store(config.state_dir, keyring, config.clear_sessions)
        stats = DaemonStats()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.roster = Roster(
            config,
            store,
            wall=self.wall,
            rng=self._rng,
            stats=stats,
            offload=offload,
            key_source=key_source,
            # Fleet mode ([cluster]): imported only then, so a single host never loads Redis.
            fleet=None if config.cluster is None else _fleet(config, self.wall, store),
            on_change=self._profile_changed,
        )
        self.telemetry = Telemetry(
            self.roster,
            stats,
            config=lambda: self.config,
            server=lambda: self.server,
            offload=offload,
        )
        self.server: Server | None = None
        self.listener: Listener | None = None
        #: The Merchant API proxy, when [proxy] enables a listener.
        self.proxy: Proxy | None = None
        #: Customer sessions, when `[apps]` configures any (made once serving starts).
        self.customers: CustomerSessions | None = None
        self._transport = transport
        self._offload = offload
        # Reading the config may be abandoned (nothing half-done is left behind), unlike
        # writing state; tests inject an offload that runs in place, used for both.
        self._read_offload: Offload = abandonable if offload is trio.to_thread.run_sync else offload
        #: The reload under way, which SIGTERM cancels.
        self._reloading: trio.CancelScope | None = None
        self._stop = trio.Event()
        self._status_dirty = trio.Event()

    @property
    def profiles(self) -> dict[str, Profile]:
        """The live profiles by name (the roster's)."""
        return self.roster.profiles

    # -- running -----------------------------------------------------------------------

    async def run(
        self,
        *,
        listener: Listener | None = None,
        handle_signals: bool = True,
        task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until `stop()` (or SIGTERM/SIGINT), then shut down gracefully."""
        if not handle_signals:
            await self._run(listener, None, task_status)
            return
        # Installed for the whole run, so a second signal during the shutdown is
        # absorbed rather than killing the process half-way.
        wanted = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        if fault_injection.HANG_ON_SIGUSR1 in self.faults:
            wanted.append(signal.SIGUSR1)
        with trio.open_signal_receiver(*wanted) as signals:
            await self._run(listener, signals, task_status)

    async def _run(
        self,
        listener: Listener | None,
        signals: AsyncIterator[int] | None,
        task_status: trio.TaskStatus[Daemon],
    ) -> None:
        store = self.roster.store
        for leftover in await self._offload(store.prepare):
            log.info("removed_partial_write", path=leftover)
        try:
            await self._serve(self.config, listener, signals, task_status)
        finally:
            store.close()  # and with it the state directory's lock
        log.info("stopped")

    async def _serve(
        self,
        config: BrokerConfig,
        listener: Listener | None,
        signals: AsyncIterator[int] | None,
        task_status: trio.TaskStatus[Daemon],
    ) -> None:
        roster = self.roster
        records = await self._offload(roster.load_records, list(config.profiles))
        if roster.store.stale:
            # In clear or under a previous key: each is sealed again at its next write.
            log.info("sessions_to_reseal", count=len(roster.store.stale))
        listener = (
            listener
            or from_systemd()
            or bind(
                config.socket,
                config.socket_mode or (0o660 if config.socket_group else 0o600),
                config.socket_group,
            )
        )
        self.listener = listener
        try:
            async with httpx.AsyncClient(
                transport=self._transport,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                follow_redirects=False,
            ) as http:
                self.telemetry.mark_started()
                roster.open(http, records)
                del records  # their secrets now live in the sessions only
                api = Api(
                    roster.profiles,
                    metrics=self.telemetry.metrics_text,
                    sealing=roster.sealing_status,
                )
                api.metrics_readers = _metrics_readers(config)
                if config.apps:
                    self.customers = await self._open_customers(config, http)
                    api.session_ops.customers = self.customers
                    api.session_ops.apps = dict(config.apps)
                self.server = server = Server(api, config, self.wall, self.telemetry.stats.server)
                if config.proxy.enabled:
                    self.proxy = Proxy(
                        api,
                        config,
                        self.wall,
                        observable=self.telemetry,
                        metrics=self.telemetry.metrics,
                        offload=self._offload,
                    )
                    self.proxy.bind()
                async with trio.open_nursery() as nursery:
                    await self._start(nursery, server, listener, signals)
                    task_status.started(self)
                    await self._stop.wait()
                    await self._shut_down(server, listener)
                    nursery.cancel_scope.cancel()
        finally:
            listener.close()
            if self.proxy is not None:
                self.proxy.close()
            if self.customers is not None:
                self.customers.store.close()

    async def _open_customers(
        self, config: BrokerConfig, http: httpx.AsyncClient
    ) -> CustomerSessions:
        """The customer sessions of `[apps]`: their store in the state directory
        (`customers.sqlite`, opened only when an app is configured), one Geins client
        per app, their metrics."""
        keyring = self.roster.store.keyring
        store: SessionStore
        if self.roster.fleet is not None:
            # Fleet mode: the sessions are in Redis, where every node finds them.
            from broker.fleet.customer_store import RedisCustomerStore

            store = RedisCustomerStore(self.roster.fleet, keyring)
        else:
            store = await self._offload(
                functools.partial(CustomerStore.in_state_dir, offload=self._offload),
                config.state_dir,
                keyring,
            )
        upstream = self.telemetry.stats.upstream
        customers = CustomerSessions(
            {name: app.settings for name, app in config.apps.items()},
            store,
            keyring,
            clients={
                name: GeinsClient(app.settings.endpoint, http, app.request_timeout, stats=upstream)
                for name, app in config.apps.items()
            },
            wall=self.wall,
            rng=self._rng,
        )
        self.telemetry.metrics.add_source(customer_gauges.source(customers))
        return customers

    async def _start(
        self,
        nursery: trio.Nursery,
        server: Server,
        listener: Listener,
        signals: AsyncIterator[int] | None,
    ) -> None:
        """Every task of the running daemon, then READY=1."""
        if self.roster.fleet is not None:
            await nursery.start(self.roster.fleet.run)
        await nursery.start(self.roster.scheduler.run)
        self.roster.plan()
        if self.customers is not None:
            await nursery.start(self.customers.run)
        await nursery.start(server.serve, listener.sock)
        if self.proxy is not None:
            await nursery.start(self.proxy.run)
        if signals is not None:
            nursery.start_soon(self._signals, signals)
        if (interval := self.notifier.watchdog_interval) is not None:
            nursery.start_soon(self._watchdog, interval)
        nursery.start_soon(self._status_updates)
        # Before READY=1: once the unit is up, so is its textfile.
        await nursery.start(self.telemetry.run_textfile)
        self.notifier.ready(self.status_line())
        # Here, not earlier: a start refused for its socket stays one line.
        self.roster.log_sealing()
        log.info(
            "ready",
            version=__version__,
            socket=listener.path,
            activated=listener.activated,
            profiles=len(self.profiles),
            **(self.proxy.describe() if self.proxy is not None else {}),
        )
        # Everything allocated so far lives as long as the daemon: keep the
        # collector from walking it again and again.
        gc.collect()
        gc.freeze()

    def stop(self) -> None:
        self._stop.set()

    async def _shut_down(self, server: Server, listener: Listener) -> None:
        self.notifier.stopping()
        log.info("stopping", in_flight=server.in_flight, connections=server.connections)
        server.stop_accepting()
        listener.close()
        if self.proxy is not None:
            self.proxy.close()
        with trio.move_on_after(self.config.shutdown_grace) as grace:
            await server.drained()
            if self.proxy is not None:
                await self.proxy.drained()
            for profile in self.profiles.values():
                await profile.flush()
            if self.customers is not None:
                await self.customers.drain()
        if grace.cancelled_caught:
            log.warning("shutdown_grace_over", in_flight=server.in_flight)

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        """SIGHUP reloads in a task of its own, so that a SIGTERM behind it is heard at
        once and cancels it: a reload never delays a shutdown."""
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    fault_injection.hang()
                elif signum != signal.SIGHUP:
                    log.info("signal", name=signal.Signals(signum).name)
                    if self._reloading is not None:
                        self._reloading.cancel()
                    self.stop()
                elif self._reloading is not None:
                    log.info("reload_already_running")
                elif not self._stop.is_set():
                    self._reloading = trio.CancelScope()
                    nursery.start_soon(self._reload_in, self._reloading)

    async def _reload_in(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self.reload()
            if scope.cancelled_caught:
                log.warning("reload_cancelled")
        finally:
            self._reloading = None

    async def reload(self) -> None:
        """Re-read the config file: profiles come and go, sessions stay; a file that
        does not read or parse changes nothing."""
        self.notifier.reloading()
        try:
            new, keyring, key_source = await read_config(
                self.config.source, self._read_offload, self._offload
            )
        except ConfigError as exc:
            log.error("reload_failed", reason=str(exc))
            self.notifier.ready(self.status_line())
            return
        await self.roster.take_keys(keyring, key_source)
        for key in self.roster.restart_warnings(new):
            log.warning("reload_needs_restart", key=key)
        await self.roster.apply(new)
        if self.server is not None:
            self.server.configure(new)
            self.server.api.metrics_readers = _metrics_readers(new)
            if self.customers is not None:
                self.server.api.session_ops.apps = dict(self.roster.config.apps)
        if self.proxy is not None:
            self.proxy.configure(new)
        self.config = self.roster.config
        log.info("reloaded", profiles=len(self.profiles))
        self.notifier.ready(self.status_line())
        self._status_dirty.set()

    # -- systemd -----------------------------------------------------------------------

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop wedges, the pings stop
        and systemd restarts the daemon."""
        while True:
            self.notifier.watchdog()
            await trio.sleep(interval)

    async def _status_updates(self) -> None:
        while True:
            await self._status_dirty.wait()
            self._status_dirty = trio.Event()
            self.notifier.status(self.status_line())
            await trio.sleep(_STATUS_INTERVAL)

    def _profile_changed(self, profile: Profile) -> None:
        self._status_dirty.set()

    def status_line(self) -> str:
        states = Counter(str(p.session.state) for p in self.profiles.values())
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        connections = self.server.connections if self.server else 0
        noun = "profile" if len(self.profiles) == 1 else "profiles"
        return f"{len(self.profiles)} {noun} ({summary or 'none'}); {connections} connections"


def _metrics_readers(config: BrokerConfig) -> tuple[frozenset[int], frozenset[int]]:
    return config.metrics.allow_uids, config.metrics.allow_gids


def main(config_path: str | None = None, socket_path: str | None = None) -> int:
    logging_setup.setup()
    keep_memory_private()
    try:
        faults = fault_injection.armed()
        config = load(find_config(config_path), socket_override=socket_path)
        keyring, key_source = load_keyring(config)
        daemon = Daemon(
            config,
            faults=faults,
            keyring=keyring,
            key_source=key_source,
            wall=_clock_from_env(),
        )
    except (ConfigError, fault_injection.FaultSpecError) as exc:
        print(f"geins-broker: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(daemon.run)
    except (StateDirError, UnsafeDirectory) as exc:
        print(f"geins-broker: {exc}", file=sys.stderr)
        return 2
    except (ListenerError, StoreError) as exc:
        print(f"geins-broker: {exc}", file=sys.stderr)
        return 1
    return 0


def _fleet(config: BrokerConfig, wall: WallClock, store: Store) -> Fleet:
    """The fleet coordinator. Shared profiles are sealed in Redis with the same keys as
    the files (sealing.py): without a key the daemon refuses to start, before anything
    reaches Redis."""
    from broker.fleet.coordinator import Fleet

    cluster = config.cluster
    assert cluster is not None
    shared = [f"profile {name!r}" for name, p in config.profiles.items() if p.shared]
    shared += [f"app {name!r}" for name in config.apps]
    if shared and not store.keyring.sealing:
        raise ConfigError(
            f"{shared[0]} is shared through {cluster.display_url}, and a shared "
            "session is sealed before it reaches the store: configure a sealing key "
            "(broker.key_file, or the systemd credential; see docs/security.md)"
        )
    return Fleet(cluster, lambda: store.keyring, wall)


def _clock_from_env() -> WallClock:
    """$GEINS_BROKER_CLOCK_OFFSET (seconds) skews this daemon's wall clock: for tests
    of clock skew between fleet nodes, which run on one machine."""
    offset = os.environ.get("GEINS_BROKER_CLOCK_OFFSET")
    if not offset:
        return SystemClock()
    try:
        return OffsetClock(float(offset))
    except ValueError:
        raise ConfigError(f"GEINS_BROKER_CLOCK_OFFSET is not a number: {offset!r}") from None
