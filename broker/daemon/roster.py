"""The profile table: every configured profile's `Profile`, and what a reload does to it.

At start each profile is built and given its saved session (a file that does not open
costs only its own profile, which starts logged out). A reload (SIGHUP) re-reads the
file and diffs the table: a removed profile is retired but kept, so that a later reload
that brings it back gets the very object (its lock may still guard an exchange under
way, and its session is newer than the file); a new one is built from its file; the
others are reconfigured in place and keep their sessions. Keys from a reload replace
the store's keyring, and profiles whose session did not open try again.

What a reload cannot change (the socket, the state directory, fleet membership, an
app's settings, a new app) is kept from the running configuration, with a warning that
it needs a restart. Who may use an app changes at once; a removed app is refused at
once (its sessions stay in the store for a restart that brings it back).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio

from broker.core.clock import WallClock
from broker.core.errors import StoreError
from broker.core.sealing import Keyring
from broker.core.stats import DaemonStats
from broker.daemon.config import BrokerConfig, ConfigError, load
from broker.daemon.config_apps import AppConfig
from broker.daemon.config_profiles import ProfileConfig
from broker.observe.log import events
from broker.sessions.profile import Offload, Profile
from broker.sessions.scheduler import Scheduler
from broker.storage.keys import load_keyring
from broker.storage.store import CorruptState, Record, SealedState, Store

if TYPE_CHECKING:
    from pathlib import Path

    from broker.fleet.coordinator import Fleet

log = events("broker.daemon")

#: How long a reload may take to read the config file (a hung network file system).
CONFIG_READ_TIMEOUT: Final = 10.0
#: Settings a reload cannot change: they are kept from the running configuration.
RESTART_KEYS: Final = ("socket", "state_dir", "socket_mode", "socket_group", "cluster")


class Roster:
    """The profiles by name, the retired ones, and what building a profile takes (the
    store, the clocks, the refresh limiter, the HTTP client, the fleet to attach to).

    Its ~15 attributes are those ingredients: every one is handed to each profile it
    builds, on start and on reload alike."""

    def __init__(
        self,
        config: BrokerConfig,
        store: Store,
        *,
        wall: WallClock,
        rng: random.Random,
        stats: DaemonStats,
        offload: Offload,
        key_source: str,
        fleet: Fleet | None,
        on_change: Callable[[Profile], None],
    ) -> None:
        #: The configuration the table was last built from (the token wait and the
        #: start-up spread of new profiles).
        self.config = config
        #: The apps the customer sessions were started with: a reload changes who may
        #: use them, removes them, never adds one or changes its settings.
        self.started_apps = dict(config.apps)
        self.store = store
        #: Where the store's current keys came from (for the sealing log line).
        self.key_source = key_source
        self.fleet = fleet
        self.wall = wall
        self.scheduler = Scheduler(wall)
        self.profiles: dict[str, Profile] = {}
        #: Profiles a reload removed, kept in case a later reload brings them back.
        self.retired: dict[str, Profile] = {}
        #: At most `max_concurrent_refreshes` refreshes at once; made in `open`.
        self.limiter: trio.CapacityLimiter | None = None
        self._rng = rng
        self._stats = stats
        self._offload = offload
        self._on_change = on_change
        self._http: httpx.AsyncClient | None = None

    def open(self, http: httpx.AsyncClient, records: dict[str, Record]) -> None:
        """Build every configured profile, each with its saved session if it has one."""
        self._http = http
        self.limiter = trio.CapacityLimiter(self.config.max_concurrent_refreshes)
        for name, profile_config in self.config.profiles.items():
            self._add(profile_config, records.get(name))

    def plan(self) -> None:
        """Every profile schedules its next refresh (once the scheduler runs)."""
        for profile in self.profiles.values():
            profile.plan()

    def load_records(self, names: list[str]) -> dict[str, Record]:
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

    def _add(self, config: ProfileConfig, record: Record | None) -> Profile:
        assert self._http is not None, "open() first"
        assert self.limiter is not None
        profile = Profile(
            config,
            http=self._http,
            store=self.store,
            wall=self.wall,
            limiter=self.limiter,
            rng=self._rng,
            token_wait=self.config.token_wait,
            on_change=self._on_change,
            offload=self._offload,
            scheduler=self.scheduler,
            stats=self._stats,
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

    # -- sealing -------------------------------------------------------------------------

    def sealing_status(self) -> str:
        """For `status`: the keyring of the moment (a reload may replace it)."""
        return self.store.keyring.describe()

    def log_sealing(self) -> None:
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

    async def take_keys(self, keyring: Keyring, source: str) -> None:
        """Keys from a reload; then profiles that were sealed try again."""
        if keyring != self.store.keyring:
            self.store.keyring, self.key_source = keyring, source
            self.log_sealing()
        await self._unseal()

    async def _unseal(self) -> None:
        """Profiles whose saved session did not open try again (the key may be back)."""
        for name, profile in list(self.profiles.items()):
            if profile.session.sealed is None:
                continue
            try:
                record = await self._offload(self.store.load, name)
            except SealedState as exc:
                profile.session.found_sealed(str(exc))
                continue
            except (CorruptState, StoreError) as exc:
                log.error("state_unreadable", profile=name, reason=str(exc))
                record = None
            profile.unseal(record, self.config.startup_spread)
            log.info("unsealed", profile=name, state=profile.session.state)

    # -- reload --------------------------------------------------------------------------

    def restart_warnings(self, new: BrokerConfig) -> list[str]:
        """The keys `new` changes that only a restart applies."""
        keys = [key for key in RESTART_KEYS if getattr(new, key) != getattr(self.config, key)]
        for name in new.profiles.keys() & self.profiles.keys():
            if new.profiles[name].shared != self.profiles[name].config.shared:
                keys.append(f"profiles.{name}.shared")
        for name, app in new.apps.items():
            running = self.started_apps.get(name)
            if running is None or app_settings(app) != app_settings(running):
                keys.append(f"apps.{name}")
        return keys

    async def apply(self, new: BrokerConfig) -> None:
        """Profiles come and go as `new` says; the others are reconfigured and keep
        their sessions."""
        self.config = replace(
            kept_across_reload(new, self.config), apps=kept_apps(new, self.started_apps)
        )
        for name in [n for n in self.started_apps if n not in new.apps]:
            log.info("app_removed", app=name)
        for name in [n for n in self.profiles if n not in new.profiles]:
            retired = self.retired[name] = self.profiles.pop(name)
            retired.retire()
            log.info("profile_removed", profile=name)
        added = [n for n in new.profiles if n not in self.profiles and n not in self.retired]
        records = await self._offload(self.load_records, added)
        for name, profile_config in new.profiles.items():
            if name in self.profiles:
                self.profiles[name].reconfigure(profile_config, new.token_wait)
            elif name in self.retired:
                # The very object that left: its lock still guards an exchange that may
                # be under way, and its session is newer than the file.
                self.profiles[name] = self.retired.pop(name)
                self.profiles[name].reinstate(profile_config)
                log.info("profile_added", profile=name, kept_session=True)
            else:
                self._add(profile_config, records.get(name)).plan()
                log.info("profile_added", profile=name)
        assert self.limiter is not None
        self.limiter.total_tokens = new.max_concurrent_refreshes


async def read_config(
    source: Path | None, read_offload: Offload, offload: Offload
) -> tuple[BrokerConfig, Keyring, str]:
    """The config file again, and its keys, for a reload; ConfigError if either fails.

    The read runs through `read_offload`, which a cancellation (SIGTERM) may abandon,
    and gives up after CONFIG_READ_TIMEOUT; key files are opened O_NONBLOCK and must be
    regular files, so no FIFO waits there."""
    if source is None:
        raise ConfigError("no config file to reload")
    new: BrokerConfig | None = None
    with trio.move_on_after(CONFIG_READ_TIMEOUT):
        new = await read_offload(load, source)
    if new is None:
        raise ConfigError(f"{source}: not read within {CONFIG_READ_TIMEOUT:g} s")
    keyring, key_source = await offload(load_keyring, new)
    return new, keyring, key_source


async def abandonable(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking read in a thread that a cancellation may leave behind."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def app_settings(app: AppConfig) -> tuple[object, ...]:
    """What only a restart changes of an app: everything but who may use it."""
    return (app.settings, app.request_timeout)


def kept_apps(new: BrokerConfig, started: Mapping[str, AppConfig]) -> dict[str, AppConfig]:
    """The apps after a reload: those `new` keeps of the ones the daemon started with,
    each with `new`'s allow lists and its running settings. An app `new` removes is
    refused at once (`unknown_app`; its sessions stay stored); one it adds waits for a
    restart."""
    return {
        name: replace(
            app, settings=started[name].settings, request_timeout=started[name].request_timeout
        )
        for name, app in new.apps.items()
        if name in started
    }


def kept_across_reload(new: BrokerConfig, old: BrokerConfig) -> BrokerConfig:
    """`new`, with what a reload cannot change (RESTART_KEYS) taken from `old`."""
    return replace(new, **{key: getattr(old, key) for key in RESTART_KEYS})
