"""`geins-broker serve`: config, store, profiles, server, signals and systemd, wired.

Start-up: read the config, open and lock the state directory (refusing one that is a
link, another uid's, or writable by others: exit 2), restore every saved session
(overdue refreshes spread out, at most `max_concurrent_refreshes` at once), take the
socket (from systemd, or bind it), start serving, then tell systemd READY=1.

SIGTERM/SIGINT: STOPPING=1, stop accepting, give requests in flight `shutdown_grace`
seconds, finish pending writes, remove the socket, exit 0. SIGHUP: reload the config,
adding and removing profiles without touching the others' sessions.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio

from broker import __version__
from broker.core.clock import OffsetClock, SystemClock, WallClock
from broker.core.errors import Internal, StateDirError, StoreError
from broker.core.sealing import Keyring
from broker.core.stats import DaemonStats
from broker.daemon import fault_injection
from broker.daemon.config import BrokerConfig, ConfigError, ProfileConfig, find_config, load
from broker.daemon.hardening import keep_memory_private
from broker.daemon.notify import Notifier
from broker.observe import log as logging_setup
from broker.observe.log import events
from broker.observe.metrics import CONTENT_TYPE, Metrics, render, write_textfile
from broker.proxy.service import Proxy
from broker.rpc.listener import Listener, ListenerError, UnsafeDirectory, bind, from_systemd
from broker.rpc.ops import Api
from broker.rpc.reactor import Server
from broker.sessions.profile import Offload, Profile
from broker.sessions.scheduler import Scheduler
from broker.storage.keys import load_keyring
from broker.storage.store import CorruptState, Record, SealedState, Store
from geins_broker_client.calls import parse_profile_status
from geins_broker_client.health import Health, judge

if TYPE_CHECKING:
    from broker.fleet.coordinator import Fleet

log = events("broker.daemon")

#: STATUS= lines to systemd at most this often.
_STATUS_INTERVAL: Final = 1.0
#: How long a reload may take to read the config file (a hung network file system).
CONFIG_READ_TIMEOUT: Final = 10.0


async def _abandonable(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking read in a thread that a cancellation may leave behind."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


class Daemon:
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
    ) -> None:
        self.config = config
        #: Test-only faults (broker/daemon/fault_injection.py); empty in production.
        self.faults = faults
        if keyring is None:
            keyring, self.key_source = load_keyring(config)
        else:
            self.key_source = "given"
        self.wall = wall or SystemClock()
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.notifier = notifier or Notifier()
        self.store = Store(config.state_dir, keyring, config.clear_sessions)
        self.profiles: dict[str, Profile] = {}
        self._transport = transport
        self._offload = offload
        # Reading the config may be abandoned (nothing half-done is left behind), unlike
        # writing state; tests inject an offload that runs in place, used for both.
        self._read_offload: Offload = (
            _abandonable if offload is trio.to_thread.run_sync else offload
        )
        #: The reload under way, which SIGTERM cancels.
        self._reloading: trio.CancelScope | None = None
        self.scheduler = Scheduler(self.wall)
        #: Profiles a reload removed, kept in case a later reload brings them back.
        self._retired: dict[str, Profile] = {}
        self._stop = trio.Event()
        self._status_dirty = trio.Event()
        self.server: Server | None = None
        self.listener: Listener | None = None
        self.stats = DaemonStats()
        self.metrics = Metrics(self)
        self._started_at = self.wall.now()
        self._limiter: trio.CapacityLimiter | None = None
        self._textfile_error: str | None = None
        self._render_flight: _Flight | None = None
        #: The Merchant API proxy, when [proxy] enables a listener.
        self.proxy: Proxy | None = None
        #: Fleet mode ([cluster]): imported only then, so a single host never loads Redis.
        self.fleet: Fleet | None = None
        if config.cluster is not None:
            self.fleet = _fleet(config, self.wall, self.store)
            from broker.fleet.gauges import source

            self.metrics.add_source(source(self.fleet, lambda: self.config.metrics.per_profile))

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
        config = self.config
        for leftover in await self._offload(self.store.prepare):
            log.info("removed_partial_write", path=leftover)
        try:
            await self._serve(config, listener, signals, task_status)
        finally:
            self.store.close()  # and with it the state directory's lock
        log.info("stopped")

    async def _serve(
        self,
        config: BrokerConfig,
        listener: Listener | None,
        signals: AsyncIterator[int] | None,
        task_status: trio.TaskStatus[Daemon],
    ) -> None:
        records = await self._offload(self._load_records, list(config.profiles))
        if self.store.stale:
            # In clear or under a previous key: each is sealed again at its next write.
            log.info("sessions_to_reseal", count=len(self.store.stale))
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
                self._http = http
                self._started_at = self.wall.now()
                self._limiter = trio.CapacityLimiter(config.max_concurrent_refreshes)
                for name, profile_config in config.profiles.items():
                    self._add_profile(profile_config, records.get(name))
                api = Api(self.profiles, metrics=self.metrics_text, sealing=self._sealing_status)
                api.metrics_readers = _metrics_readers(config)
                self.server = server = Server(api, config, self.wall, self.stats.server)
                del records  # their secrets now live in the sessions only
                if config.proxy.enabled:
                    self.proxy = Proxy(
                        api,
                        config,
                        self.wall,
                        observable=self,
                        metrics=self.metrics,
                        offload=self._offload,
                    )
                    self.proxy.bind()
                async with trio.open_nursery() as nursery:
                    if self.fleet is not None:
                        await nursery.start(self.fleet.run)
                    await nursery.start(self.scheduler.run)
                    for profile in self.profiles.values():
                        profile.plan()
                    await nursery.start(server.serve, listener.sock)
                    if self.proxy is not None:
                        await nursery.start(self.proxy.run)
                    if signals is not None:
                        nursery.start_soon(self._signals, signals)
                    if (interval := self.notifier.watchdog_interval) is not None:
                        nursery.start_soon(self._watchdog, interval)
                    nursery.start_soon(self._status_updates)
                    if config.metrics.textfile is not None:
                        # Before READY=1: once the unit is up, so is its textfile.
                        await self._write_textfile(config.metrics.textfile)
                    nursery.start_soon(self._textfile_writer)
                    self.notifier.ready(self.status_line())
                    # Here, not earlier: a start refused for its socket stays one line.
                    self._log_sealing()
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
                    task_status.started(self)
                    await self._stop.wait()
                    await self._shut_down(server, listener)
                    nursery.cancel_scope.cancel()
        finally:
            listener.close()
            if self.proxy is not None:
                self.proxy.close()

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

    def status_line(self) -> str:
        states = Counter(str(p.session.state) for p in self.profiles.values())
        summary = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        connections = self.server.connections if self.server else 0
        noun = "profile" if len(self.profiles) == 1 else "profiles"
        return f"{len(self.profiles)} {noun} ({summary or 'none'}); {connections} connections"

    # -- observability -------------------------------------------------------------------

    # What metrics.Metrics reads (its `Observed` protocol).
    @property
    def started_at(self) -> float:
        return self._started_at

    @property
    def per_profile(self) -> bool:
        return self.config.metrics.per_profile

    def live_profiles(self) -> Iterable[Profile]:
        return self.profiles.values()

    def retired_profiles(self) -> Iterable[Profile]:
        return self._retired.values()

    def connection_count(self) -> int:
        return self.server.connections if self.server else 0

    def waiting_ops(self) -> Mapping[str, int]:
        return self.server.waiting_by_op if self.server else {}

    def refreshes_in_flight(self) -> int:
        return int(self._limiter.borrowed_tokens) if self._limiter else 0

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
        statuses = [parse_profile_status(p.status()) for p in self.profiles.values()]
        return judge(statuses, self.wall.now())

    async def _textfile_writer(self) -> None:
        """Write the node_exporter textfile every `textfile_interval` seconds (both
        read afresh each time, so a reload may start, move or stop it)."""
        while True:
            await trio.sleep(self.config.metrics.textfile_interval)
            if (path := self.config.metrics.textfile) is not None:
                await self._write_textfile(path)

    async def _write_textfile(self, path: Path) -> None:
        try:
            await self._offload(write_textfile, path, await self.render_metrics())
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

    # -- profiles ----------------------------------------------------------------------

    def _load_records(self, names: list[str]) -> dict[str, Record]:
        """Every saved session (blocking: run in a thread). A bad file costs only its
        own profile, which starts logged out."""
        records: dict[str, Record] = {}
        for name in names:
            try:
                record = self.store.load(name)
            except CorruptState as exc:
                log.error("state_corrupt", profile=name, reason=str(exc), set_aside=exc.set_aside)
                continue
            except SealedState as exc:
                log.error("state_sealed", profile=name, reason=str(exc), key=exc.key_id)
                continue
            except StoreError as exc:
                log.error("state_unreadable", profile=name, reason=str(exc))
                continue
            if record is not None:
                records[name] = record
        return records

    def _add_profile(self, config: ProfileConfig, record: Record | None) -> Profile:
        assert self._limiter is not None
        profile = Profile(
            config,
            http=self._http,
            store=self.store,
            wall=self.wall,
            limiter=self._limiter,
            rng=self.rng,
            token_wait=self.config.token_wait,
            on_change=self._profile_changed,
            offload=self._offload,
            scheduler=self.scheduler,
            stats=self.stats,
        )
        if record is not None:
            profile.restore(record, self.config.startup_spread)
            log.info(
                "restored",
                profile=config.name,
                state=profile.session.state,
                username=record.username,
            )
        if (sealed := self.store.unopened.get(config.name)) is not None:
            profile.mark_sealed(sealed)
        if self.fleet is not None and config.shared:
            self.fleet.attach(profile, record)
        self.profiles[config.name] = profile
        return profile

    def _sealing_status(self) -> str:
        """For `status`: the keyring of the moment (a reload may replace it)."""
        return self.store.keyring.describe()

    def _log_sealing(self) -> None:
        keyring = self.store.keyring
        if keyring.current is None:
            # Info, not a warning: no key is a supported choice (docs/security.md), and a
            # clean start's journal holds no warning.
            log.info("sealing_off", reason="no key configured: sessions are stored in clear")
            return
        log.info(
            "sealing_on",
            key=keyring.current.name,
            source=self.key_source,
            previous=",".join(k.name for k in keyring.previous) or None,
        )

    async def _take_keys(self, keyring: Keyring, source: str) -> None:
        """Keys from a reload; then profiles that were sealed try again."""
        if keyring != self.store.keyring:
            self.store.keyring, self.key_source = keyring, source
            self._log_sealing()
        await self._unseal()

    async def _unseal(self) -> None:
        """Profiles whose saved session did not open try again (the key may be back)."""
        for name, profile in list(self.profiles.items()):
            if profile.session.sealed is None:
                continue
            try:
                record = await self._offload(self.store.load, name)
            except SealedState as exc:
                profile.session.sealed = str(exc)
                continue
            except (CorruptState, StoreError) as exc:
                log.error("state_unreadable", profile=name, reason=str(exc))
                record = None
            profile.unseal(record, self.config.startup_spread)
            log.info("unsealed", profile=name, state=profile.session.state)

    def _profile_changed(self, profile: Profile) -> None:
        self._status_dirty.set()

    async def reload(self) -> None:
        """Re-read the config file: profiles come and go, sessions stay."""
        self.notifier.reloading()
        source = self.config.source
        new: BrokerConfig | None = None
        try:
            if source is None:
                raise ConfigError("no config file to reload")
            with trio.move_on_after(CONFIG_READ_TIMEOUT):
                new = await self._read_offload(load, source)
            if new is None:
                raise ConfigError(f"{source}: not read within {CONFIG_READ_TIMEOUT:g} s")
            # Key files are opened O_NONBLOCK and must be regular files: no FIFO waits.
            keyring, key_source = await self._offload(load_keyring, new)
        except ConfigError as exc:
            log.error("reload_failed", reason=str(exc))
            self.notifier.ready(self.status_line())
            return
        old = self.config
        await self._take_keys(keyring, key_source)
        self._warn_needs_restart(new, old)
        for name in [n for n in self.profiles if n not in new.profiles]:
            retired = self._retired[name] = self.profiles.pop(name)
            retired.retire()
            log.info("profile_removed", profile=name)
        added = [n for n in new.profiles if n not in self.profiles and n not in self._retired]
        records = await self._offload(self._load_records, added)
        for name, profile_config in new.profiles.items():
            if name in self.profiles:
                self.profiles[name].reconfigure(profile_config, new.token_wait)
            elif name in self._retired:
                # The very object that left: its lock still guards an exchange that may
                # be under way, and its session is newer than the file.
                self.profiles[name] = self._retired.pop(name)
                self.profiles[name].reinstate(profile_config)
                log.info("profile_added", profile=name, kept_session=True)
            else:
                self._add_profile(profile_config, records.get(name)).plan()
                log.info("profile_added", profile=name)
        assert self._limiter is not None
        self._limiter.total_tokens = new.max_concurrent_refreshes
        if self.server is not None:
            self.server.configure(new)
            self.server.api.metrics_readers = _metrics_readers(new)
        if self.proxy is not None:
            self.proxy.configure(new)
        self.config = new_with_kept_paths(new, old)
        log.info("reloaded", profiles=len(self.profiles))
        self.notifier.ready(self.status_line())
        self._status_dirty.set()

    def _warn_needs_restart(self, new: BrokerConfig, old: BrokerConfig) -> None:
        for key in ("socket", "state_dir", "socket_mode", "socket_group", "cluster"):
            if getattr(new, key) != getattr(old, key):
                log.warning("reload_needs_restart", key=key)
        for name in new.profiles.keys() & self.profiles.keys():
            if new.profiles[name].shared != self.profiles[name].config.shared:
                log.warning("reload_needs_restart", key=f"profiles.{name}.shared")


def _metrics_readers(config: BrokerConfig) -> tuple[frozenset[int], frozenset[int]]:
    return config.metrics.allow_uids, config.metrics.allow_gids


class _Flight:
    """One render of the metrics, and everyone waiting for it."""

    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: bytes | None = None


def new_with_kept_paths(new: BrokerConfig, old: BrokerConfig) -> BrokerConfig:
    """A reload cannot move the socket or the state, nor join or leave a fleet: those
    need a restart."""
    return replace(
        new,
        socket=old.socket,
        state_dir=old.state_dir,
        socket_mode=old.socket_mode,
        socket_group=old.socket_group,
        cluster=old.cluster,
    )


def main(config_path: str | None = None, socket_path: str | None = None) -> int:
    logging_setup.setup()
    keep_memory_private()
    try:
        faults = fault_injection.armed()
        config = load(find_config(config_path), socket_override=socket_path)
        keyring, key_source = load_keyring(config)
        daemon = Daemon(config, faults=faults, keyring=keyring, wall=_clock_from_env())
    except (ConfigError, fault_injection.FaultSpecError) as exc:
        print(f"geins-broker: {exc}", file=sys.stderr)
        return 2
    daemon.key_source = key_source
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
    shared = [name for name, p in config.profiles.items() if p.shared]
    if shared and not store.keyring.sealing:
        raise ConfigError(
            f"profile {shared[0]!r} is shared through {cluster.display_url}, and a shared "
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
