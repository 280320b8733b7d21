"""The daemon's TOML configuration: the file, where it and the daemon's sockets and state
live by default, the `[broker]` table, and the whole parsed into one `BrokerConfig`.

Each other table has its own module: `[profiles.*]` (config_profiles), `[apps.*]`
(config_apps), `[proxy]` (config_proxy), `[metrics]` (config_metrics), `[cluster]`
(broker.fleet.settings, loaded only when the table is there); what several read alike
is in config_values. A mistake in the file is one `ConfigError` naming the file, the
key and what is wrong; the daemon prints it and exits 2 (or, on SIGHUP, keeps the
configuration it has).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import platformdirs

# ConfigError is re-exported: callers of `load` catch it from here.
from broker.core.tables import ConfigError as ConfigError  # noqa: PLC0414
from broker.core.tables import TableReader
from broker.daemon.config_apps import AppConfig, parse_app
from broker.daemon.config_metrics import MetricsConfig, parse_metrics
from broker.daemon.config_profiles import ProfileConfig, parse_profile
from broker.daemon.config_proxy import NO_PROXY, ProxyConfig, parse_proxy
from broker.daemon.config_values import DAY, HOUR, check_socket_path, gid
from geins_broker_client.paths import APP_DIR, ENV_SOCKET, SOCKET_NAME, temp_dir
from geins_broker_client.trust import own_directory_problem

if TYPE_CHECKING:
    from broker.fleet.settings import ClusterConfig

ENV_CONFIG: Final = "GEINS_BROKER_CONFIG"
SYSTEM_CONFIG: Final = Path("/etc/geins-broker/config.toml")
#: A config file is a few kilobytes; ten thousand profiles are about a megabyte.
MAX_CONFIG_SIZE: Final = 16 * 1024 * 1024
#: A bound on unread answers below one token answer would close every slow reader.
_MIN_UNREAD: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    source: Path | None
    socket: Path
    state_dir: Path
    profiles: Mapping[str, ProfileConfig]
    #: Storefront apps with customer sessions (`[apps.NAME]`); none: no session store.
    apps: Mapping[str, AppConfig] = field(default_factory=dict)
    socket_mode: int | None = None
    socket_group: int | None = None
    max_connections: int = 1024
    #: Connections one uid other than root and the daemon's may hold.
    max_connections_per_uid: int = 64
    #: Of max_connections, how many only root and the daemon's user may take.
    admin_reserved_connections: int = 16
    max_requests_per_connection: int = 32
    #: Bytes of answers a client may leave unread on one connection (beyond one
    #: answer), and on all of them together, before its connection is closed.
    max_unread_bytes: int = 1024 * 1024
    max_unread_total: int = 64 * 1024 * 1024
    idle_timeout: float = 300.0
    #: The idle timeout of a peer that may read no profile.
    stranger_idle_timeout: float = 10.0
    #: How long a half-received frame may sit before the connection is closed.
    frame_timeout: float = 10.0
    #: How long a client may leave answers unread before the connection is closed.
    send_timeout: float = 10.0
    #: How long a `token` call waits for a refresh it needs.
    token_wait: float = 15.0
    max_concurrent_refreshes: int = 4
    #: Overdue refreshes after a restart are spread over this many seconds.
    startup_spread: float = 10.0
    #: How long SIGTERM waits for requests in flight.
    shutdown_grace: float = 5.0
    proxy: ProxyConfig = NO_PROXY
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: Fleet mode ([cluster]); None: every profile is this host's alone.
    cluster: ClusterConfig | None = None
    #: The key that seals sessions at rest (after the systemd credential; see keys.py).
    key_file: Path | None = None
    #: A key that still opens what it sealed, while sessions move to `key_file`'s.
    previous_key_file: Path | None = None
    #: A session file in clear while a key is set: "after_rekey" (refused once
    #: `rekey` has run), "refuse" or "accept" (store.py, docs/configuration.md).
    clear_sessions: str = "after_rekey"


# -- where things are ------------------------------------------------------------------------


def _dirs() -> platformdirs.PlatformDirs:
    return platformdirs.PlatformDirs(APP_DIR, appauthor=False)


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to read: --config, $GEINS_BROKER_CONFIG, the user's, the system's."""
    if explicit is not None:
        return Path(explicit)
    if env := os.environ.get(ENV_CONFIG):
        return Path(env)
    candidates = [Path(_dirs().user_config_dir) / "config.toml", SYSTEM_CONFIG]
    if conf_dir := os.environ.get("CONFIGURATION_DIRECTORY"):
        candidates.insert(0, Path(conf_dir.split(":")[0]) / "config.toml")
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ConfigError(
        "no configuration file: create "
        + " or ".join(str(c) for c in candidates[-2:])
        + f", or pass --config or set ${ENV_CONFIG} (see README.md)"
    )


def default_socket() -> Path:
    """$GEINS_BROKER_SOCKET, systemd's $RUNTIME_DIRECTORY, else under `runtime_dir()`.

    The client's list of places (geins_broker_client.paths.candidate_sockets) holds
    every answer this can give; a test keeps the two in step.
    """
    if env := os.environ.get(ENV_SOCKET):
        return Path(env)
    if runtime := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(runtime.split(":")[0]) / SOCKET_NAME
    return runtime_dir() / APP_DIR / SOCKET_NAME


def runtime_dir() -> Path:
    """The user's runtime directory: $XDG_RUNTIME_DIR if it exists, /run/user/UID if it
    exists and is ours, else TMPDIR/runtime-UID, made 0700 here if missing.

    Computed here rather than by platformdirs, whose answer changed between versions.
    Whichever it is must be ours, no symlink, and not writable by group or others: the
    last resort lies in a directory everyone can write, where another user may have made
    it first to plant a socket where our clients look (ConfigError; the daemon exits 2).
    """
    uid = os.geteuid()
    chosen = None
    if (xdg := os.environ.get("XDG_RUNTIME_DIR")) and os.path.isdir(xdg):
        chosen = Path(xdg)
    else:
        user_run = Path(f"/run/user/{uid}")
        with contextlib.suppress(OSError):
            info = user_run.lstat()
            if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
                chosen = user_run
    if chosen is None:
        chosen = Path(temp_dir()) / f"runtime-{uid}"
        try:
            chosen.mkdir(mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"{chosen}: cannot create ({exc.strerror})") from None
    if (problem := own_directory_problem(chosen)) is not None:
        raise ConfigError(f"{chosen}: {problem}")
    return chosen


def default_state_dir() -> Path:
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0])
    return Path(_dirs().user_state_dir)


# -- reading ---------------------------------------------------------------------------------


def load(path: Path, *, socket_override: str | None = None) -> BrokerConfig:
    return parse(_toml(path), path, socket_override=socket_override)


def _toml(path: Path) -> dict[str, Any]:
    """The file's TOML. Only a regular file of at most `MAX_CONFIG_SIZE` bytes is read,
    opened without blocking: a FIFO (or a device) at the config path would otherwise
    hold the reader, and with it a reload and the SIGTERM behind it, for ever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML (not UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None


def parse(
    data: Mapping[str, Any], source: Path, *, socket_override: str | None = None
) -> BrokerConfig:
    top = TableReader(source, data, "")
    broker = TableReader(source, top.get("broker", dict, {}), "broker.")
    proxy = TableReader(source, top.get("proxy", dict, {}), "proxy.")
    profiles_table = top.get("profiles", dict, {})
    apps_table = top.get("apps", dict, {})
    cluster_table = top.get("cluster", dict)
    metrics = parse_metrics(TableReader(source, top.get("metrics", dict, {}), "metrics."))
    top.check_unknown()
    if not profiles_table and not apps_table:
        raise top.error(
            "profiles", "configure at least one profile or app, e.g. [profiles.default]"
        )
    profiles = {name: parse_profile(source, name, table) for name, table in profiles_table.items()}
    apps = {name: parse_app(source, name, table) for name, table in apps_table.items()}
    cluster = None
    if cluster_table is not None:
        from broker.fleet.settings import parse_cluster

        said = {name: profile.shared for name, profile in profiles.items()}
        cluster, shared = parse_cluster(TableReader(source, cluster_table, "cluster."), said)
        profiles = {name: replace(p, shared=shared[name]) for name, p in profiles.items()}
    elif any(p.shared for p in profiles.values()):
        shared = next(n for n, p in profiles.items() if p.shared)
        raise ConfigError(f"{source}: profiles.{shared}.shared: needs a [cluster] table")

    # Read (and its type checked) even when --socket overrides it: the key is known,
    # the command line merely wins over it.
    from_file = broker.get("socket", str)
    socket = Path(socket_override or from_file or default_socket())
    check_socket_path(broker, "socket", socket)
    state_dir = Path(broker.get("state_dir", str) or default_state_dir())
    mode = broker.get("socket_mode", (str, int))
    group = broker.get("socket_group", (str, int))
    config = BrokerConfig(
        source=source,
        socket=socket,
        state_dir=state_dir,
        profiles=profiles,
        apps=apps,
        socket_mode=None if mode is None else _mode(broker, mode),
        socket_group=None if group is None else gid(broker, "socket_group", group),
        max_connections=broker.count("max_connections", 1024),
        max_connections_per_uid=broker.count("max_connections_per_uid", 64),
        admin_reserved_connections=broker.count("admin_reserved_connections", 16),
        max_requests_per_connection=broker.count("max_requests_per_connection", 32),
        max_unread_bytes=broker.count("max_unread_bytes", 1024 * 1024, least=_MIN_UNREAD),
        max_unread_total=broker.count("max_unread_total", 64 * 1024 * 1024, least=_MIN_UNREAD),
        idle_timeout=broker.seconds("idle_timeout", 300.0, most=DAY),
        stranger_idle_timeout=broker.seconds("stranger_idle_timeout", 10.0, most=DAY),
        frame_timeout=broker.seconds("frame_timeout", 10.0, most=HOUR),
        send_timeout=broker.seconds("send_timeout", 10.0, most=HOUR),
        token_wait=broker.seconds("token_wait", 15.0, most=HOUR),
        max_concurrent_refreshes=broker.count("max_concurrent_refreshes", 4),
        startup_spread=broker.seconds("startup_spread", 10.0, most=DAY, zero_ok=True),
        shutdown_grace=broker.seconds("shutdown_grace", 5.0, most=HOUR),
        proxy=parse_proxy(proxy, socket),
        metrics=metrics,
        cluster=cluster,
        key_file=_file(broker, "key_file"),
        previous_key_file=_file(broker, "previous_key_file"),
        clear_sessions=_choice(broker, "clear_sessions", ("after_rekey", "refuse", "accept")),
    )
    broker.check_unknown()
    return config


def _choice(r: TableReader, key: str, choices: tuple[str, ...]) -> str:
    value = r.text(key, choices[0])
    if value not in choices:
        raise r.error(key, f"is one of {', '.join(repr(c) for c in choices)}")
    return value


def _file(r: TableReader, key: str) -> Path | None:
    """A path, relative ones taken from the config file's directory."""
    value = r.get(key, str)
    if value is None:
        return None
    if not value.strip():
        raise r.error(key, "must not be empty")
    return r.source.parent / Path(value).expanduser()


def _mode(r: TableReader, value: str | int) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else value
    except ValueError:
        raise r.error("socket_mode", f"not an octal mode: {value!r}") from None
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600:
        raise r.error(
            "socket_mode", 'must be an octal mode that lets the owner read and write, e.g. "0660"'
        )
    return mode
