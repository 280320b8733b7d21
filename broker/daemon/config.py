"""The daemon's TOML configuration, its defaults, and where each comes from.

A mistake in the file is one `ConfigError` naming the file, the key and what is wrong;
the daemon prints it and exits 2 (or, on SIGHUP, keeps the configuration it has).
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import platformdirs

# ConfigError is re-exported: callers of `load` catch it from here.
from broker.core.tables import ConfigError as ConfigError  # noqa: PLC0414
from broker.core.tables import TableReader
from broker.customers.model.app import AppSettings
from broker.customers.model.lifetime import Lifetime
from broker.customers.model.ratelimit import LoginRates, Rate
from broker.geins.protocol import (
    DEFAULT_AUTH_SERVICE_URL,
    DEFAULT_MERCHANT_API_URL,
    REQUEST_TIMEOUT,
    Endpoint,
)
from broker.observe.textfile import TextfileAccess
from broker.policy.headers import is_cookie_name
from broker.policy.session import MAX_CLOCK_SKEW, Policy
from geins_broker_client.paths import APP_DIR, ENV_SOCKET, SOCKET_NAME, temp_dir
from geins_broker_client.trust import own_directory_problem

if TYPE_CHECKING:
    from broker.fleet.settings import ClusterConfig

ENV_CONFIG: Final = "GEINS_BROKER_CONFIG"
SYSTEM_CONFIG: Final = Path("/etc/geins-broker/config.toml")
#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH: Final = 107
#: A config file is a few kilobytes; ten thousand profiles are about a megabyte.
MAX_CONFIG_SIZE: Final = 16 * 1024 * 1024
_PROFILE_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LOOPBACK: Final = {"127.0.0.1", "::1", "localhost"}
#: The proxy's Unix socket, next to the broker's.
PROXY_SOCKET_NAME: Final = "merchant.sock"
#: Upper bounds for durations: generous, but a typo of a few zeros is caught.
_HOUR: Final = 3600.0
_DAY: Final = 86400.0
#: A bound on unread answers below one token answer would close every slow reader.
_MIN_UNREAD: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    name: str
    endpoint: Endpoint
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    policy: Policy = field(default_factory=Policy)
    request_timeout: float = REQUEST_TIMEOUT
    #: Fleet mode: the session lives in the cluster's store, rotated once fleet-wide.
    #: None (not said): as `[cluster] shared` says; resolved to a bool by the parser.
    shared: bool | None = None


@dataclass(frozen=True, slots=True)
class AppConfig:
    """`[apps.NAME]`: one storefront whose customers log in at run time
    (docs/sessions.md). `settings` is what the customer-session manager runs on; who
    may create, use and end its sessions is the server's check."""

    settings: AppSettings
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    request_timeout: float = REQUEST_TIMEOUT
    #: The cookie the proxy reads a handle from (and never forwards); None: the
    #: Geins-Broker-Session header only (docs/proxy.md).
    proxy_cookie: str | None = None

    @property
    def name(self) -> str:
        return self.settings.name


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """`[metrics]`: what the collector shows and where the textfile goes."""

    #: Series per profile (expiry, state, token and refresh counts). Off for daemons
    #: with thousands of profiles: the same figures are then summed over profiles.
    per_profile: bool = True
    #: node_exporter's textfile collector: written atomically every `textfile_interval`.
    textfile: Path | None = None
    textfile_interval: float = 15.0
    #: The textfile's group (`textfile_group`, node_exporter's) and whether it is
    #: readable by everyone (`textfile_public`): 0640, or 0644 when public.
    textfile_access: TextfileAccess = field(default_factory=TextfileAccess)
    #: Who may read the metrics besides root and the daemon's user (the `metrics` op,
    #: `GET /metrics` and `GET /healthz`): Prometheus' user, say.
    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """The Merchant API proxy's listeners and limits (`[proxy]`; docs/proxy.md)."""

    #: The Unix socket, or None when `unix = false`.
    socket: Path | None
    #: Loopback TCP (host, port), or None.
    tcp: tuple[str, int] | None = None
    #: The profile a request without a Geins-Broker-Profile header uses.
    profile: str = "default"
    max_connections: int = 256
    max_header_size: int = 16 * 1024
    max_body_size: int = 10 * 1024 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    upstream_timeout: float = 30.0

    @property
    def enabled(self) -> bool:
        return self.socket is not None or self.tcp is not None


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
    proxy: ProxyConfig = ProxyConfig(socket=None)
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
    metrics = _metrics(TableReader(source, top.get("metrics", dict, {}), "metrics."))
    top.check_unknown()
    if not profiles_table and not apps_table:
        raise top.error(
            "profiles", "configure at least one profile or app, e.g. [profiles.default]"
        )
    profiles = {name: _profile(source, name, table) for name, table in profiles_table.items()}
    apps = {name: _app(source, name, table) for name, table in apps_table.items()}
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
    if (length := len(os.fsencode(socket))) > MAX_SOCKET_PATH:
        limit = f"a Unix socket path has at most {MAX_SOCKET_PATH}"
        raise broker.error("socket", f"path is {length} bytes; {limit}")
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
        socket_group=None if group is None else _gid(broker, "socket_group", group),
        max_connections=broker.count("max_connections", 1024),
        max_connections_per_uid=broker.count("max_connections_per_uid", 64),
        admin_reserved_connections=broker.count("admin_reserved_connections", 16),
        max_requests_per_connection=broker.count("max_requests_per_connection", 32),
        max_unread_bytes=broker.count("max_unread_bytes", 1024 * 1024, least=_MIN_UNREAD),
        max_unread_total=broker.count("max_unread_total", 64 * 1024 * 1024, least=_MIN_UNREAD),
        idle_timeout=broker.seconds("idle_timeout", 300.0, most=_DAY),
        stranger_idle_timeout=broker.seconds("stranger_idle_timeout", 10.0, most=_DAY),
        frame_timeout=broker.seconds("frame_timeout", 10.0, most=_HOUR),
        send_timeout=broker.seconds("send_timeout", 10.0, most=_HOUR),
        token_wait=broker.seconds("token_wait", 15.0, most=_HOUR),
        max_concurrent_refreshes=broker.count("max_concurrent_refreshes", 4),
        startup_spread=broker.seconds("startup_spread", 10.0, most=_DAY, zero_ok=True),
        shutdown_grace=broker.seconds("shutdown_grace", 5.0, most=_HOUR),
        proxy=_proxy(proxy, socket),
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


def _metrics(r: TableReader) -> MetricsConfig:
    textfile = r.get("textfile", str)
    if textfile is not None:
        path = Path(textfile)
        if not path.is_absolute():
            raise r.error("textfile", f"must be an absolute path, got {textfile!r}")
        if path.suffix != ".prom":
            # node_exporter reads only *.prom; any other name would silently go unread.
            raise r.error("textfile", "must end in .prom (node_exporter reads only those)")
    # node_exporter's group, so that it alone besides the daemon reads the file.
    group = r.get("textfile_group", (str, int))
    config = MetricsConfig(
        per_profile=bool(r.get("per_profile", bool, True)),
        textfile=None if textfile is None else Path(textfile),
        textfile_interval=r.seconds("textfile_interval", 15.0, most=_HOUR),
        textfile_access=TextfileAccess(
            gid=None if group is None else _gid(r, "textfile_group", group),
            public=bool(r.get("textfile_public", bool, False)),
        ),
        allow_uids=frozenset(_uid(r, v) for v in _list(r, "allow_users")),
        allow_gids=frozenset(_gid(r, "allow_groups", v) for v in _list(r, "allow_groups")),
    )
    if config.textfile_interval < 1:
        raise r.error("textfile_interval", "must be at least 1 second")
    r.check_unknown()
    return config


def _proxy(r: TableReader, broker_socket: Path) -> ProxyConfig:
    socket = None
    if r.get("unix", bool, True):
        socket = Path(r.get("socket", str) or default_proxy_socket(broker_socket))
        if (length := len(os.fsencode(socket))) > MAX_SOCKET_PATH:
            raise r.error("socket", f"path is {length} bytes; a Unix socket path has at most 107")
    tcp = r.get("tcp", str)
    config = ProxyConfig(
        socket=socket,
        tcp=None if tcp is None else _loopback(r, tcp),
        profile=r.text("profile", "default"),
        max_connections=r.count("max_connections", 256),
        max_header_size=r.count("max_header_size", 16 * 1024),
        max_body_size=r.count("max_body_size", 10 * 1024 * 1024),
        header_timeout=r.seconds("header_timeout", 10.0, most=_HOUR),
        idle_timeout=r.seconds("idle_timeout", 60.0, most=_HOUR),
        upstream_timeout=r.seconds("upstream_timeout", 30.0, most=_HOUR),
    )
    if config.max_header_size < 1024:
        raise r.error("max_header_size", "must be at least 1024")
    r.check_unknown()
    return config


def default_proxy_socket(broker_socket: Path) -> Path:
    """`merchant.sock` next to the broker's socket; next to a socket given another name
    (`NAME.sock`), `NAME.merchant.sock`, so daemons sharing a directory do not collide."""
    if broker_socket.name == SOCKET_NAME:
        return broker_socket.parent / PROXY_SOCKET_NAME
    return broker_socket.parent / f"{broker_socket.name.removesuffix('.sock')}.{PROXY_SOCKET_NAME}"


def _loopback(r: TableReader, value: str) -> tuple[str, int]:
    """`127.0.0.1:PORT` or `[::1]:PORT`, nothing else: the proxy hands out a user's
    session, and only on loopback can it tell which local user is calling."""
    for prefix, host in (("127.0.0.1:", "127.0.0.1"), ("[::1]:", "::1")):
        port = value.removeprefix(prefix)
        if port != value and port.isdigit() and int(port) <= 65535:
            return host, int(port)
    raise r.error("tcp", f"must be 127.0.0.1:PORT or [::1]:PORT (loopback only), got {value!r}")


def _profile(source: Path, name: str, table: Any) -> ProfileConfig:
    r = _named_table(source, "profiles", name, table)
    profile = ProfileConfig(
        name=name,
        endpoint=_endpoint(r),
        allow_uids=frozenset(_uid(r, v) for v in _list(r, "allow_users")),
        allow_gids=frozenset(_gid(r, "allow_groups", v) for v in _list(r, "allow_groups")),
        policy=_policy(
            r,
            reader_refresh_interval=r.seconds(
                "reader_refresh_interval", 30.0, most=_DAY, zero_ok=True
            ),
        ),
        request_timeout=r.seconds("request_timeout", REQUEST_TIMEOUT, most=300.0),
        shared=r.get("shared", bool),
    )
    r.check_unknown()
    return profile


def _app(source: Path, name: str, table: Any) -> AppConfig:
    """`[apps.NAME]`: the Geins keys as a profile has them, who may use the app, and
    its lifetime policy and limits (defaults: model/lifetime.py, model/ratelimit.py)."""
    r = _named_table(source, "apps", name, table)
    life, rates = Lifetime(), LoginRates()
    try:
        lifetime = Lifetime(
            idle_remembered=r.seconds("idle_remembered", life.idle_remembered, most=400 * _DAY),
            idle_short=r.seconds("idle_short", life.idle_short, most=30 * _DAY),
            max_sessions=r.count("max_sessions", life.max_sessions),
            max_per_customer=r.count("max_per_customer", life.max_per_customer),
            active_for=r.seconds("active_for", life.active_for, most=_DAY),
        )
        login_rates = LoginRates(
            per_username=_rate(r, "username", rates.per_username),
            per_uid=_rate(r, "uid", rates.per_uid),
        )
    except ValueError as exc:  # the models' own checks, should one be stricter than these
        raise ConfigError(f"{source}: apps.{name}: {exc}") from None
    defaults = AppSettings(name, _endpoint(r))
    app = AppConfig(
        settings=AppSettings(
            name=name,
            endpoint=defaults.endpoint,
            lifetime=lifetime,
            policy=_policy(r),
            rates=login_rates,
            max_refreshes=r.count("max_refreshes", defaults.max_refreshes),
            max_purges=r.count("max_purges", defaults.max_purges),
        ),
        allow_uids=frozenset(_uid(r, v) for v in _list(r, "allow_users")),
        allow_gids=frozenset(_gid(r, "allow_groups", v) for v in _list(r, "allow_groups")),
        request_timeout=r.seconds("request_timeout", REQUEST_TIMEOUT, most=300.0),
        proxy_cookie=_cookie_name(r),
    )
    r.check_unknown()
    return app


def _cookie_name(r: TableReader) -> str | None:
    name: str | None = r.get("proxy_cookie", str)
    if name is not None and (not is_cookie_name(name) or len(name) > 256):
        raise r.error("proxy_cookie", "must be a cookie name (letters, digits, !#$%&'*+-.^_`|~)")
    return name


def _rate(r: TableReader, who: str, default: Rate) -> Rate:
    """`login_burst_per_<who>` attempts at once, then one every `login_interval_per_<who>`
    seconds."""
    return Rate(
        per_second=1 / r.seconds(f"login_interval_per_{who}", 1 / default.per_second, most=_DAY),
        burst=r.count(f"login_burst_per_{who}", int(default.burst)),
    )


def _named_table(source: Path, kind: str, name: str, table: Any) -> TableReader:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {kind}.{name}: expected a table")
    if not _PROFILE_NAME.fullmatch(name):
        raise ConfigError(
            f"{source}: {kind}.{name}: a {kind[:-1]} name is 1-64 letters, digits, '_', '.', '-'"
        )
    return TableReader(source, table, f"{kind}.{name}.")


def _endpoint(r: TableReader) -> Endpoint:
    return Endpoint(
        account=r.text("account"),
        api_key=r.text("api_key"),
        environment=r.text("environment", "prod"),
        auth_service_url=_url(r, "auth_service_url", DEFAULT_AUTH_SERVICE_URL),
        merchant_api_url=_url(r, "merchant_api_url", DEFAULT_MERCHANT_API_URL),
        channel_id=r.get("channel_id", str),
        language_id=r.get("language_id", str),
        market_id=r.get("market_id", str),
    )


def _policy(r: TableReader, **more: float) -> Policy:
    refresh_at = float(r.get("refresh_at", (int, float), 0.75))
    if not 0.1 <= refresh_at <= 0.9:
        raise r.error("refresh_at", "must be between 0.1 and 0.9 (a share of the token's lifetime)")
    jitter = float(r.get("jitter", (int, float), 0.05))
    if not 0 <= jitter <= 0.2:
        raise r.error("jitter", "must be between 0 and 0.2")
    return Policy(
        refresh_at=refresh_at,
        jitter=jitter,
        max_clock_skew=r.seconds("max_clock_skew", MAX_CLOCK_SKEW, most=30 * _DAY),
        **more,
    )


def _url(r: TableReader, key: str, default: str) -> str:
    value = r.text(key, default)
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise r.error(key, f"not an http(s) URL: {value!r}")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise r.error(key, "Geins is spoken to over HTTPS only (http is allowed for loopback)")
    if parts.query or parts.fragment:
        raise r.error(key, "a base URL has no query or fragment")
    return value.rstrip("/")


def _list(r: TableReader, key: str) -> list[str | int]:
    values = r.get(key, list, [])
    for value in values:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise r.error(key, "entries are names or numeric ids")
    return list(values)


def _uid(r: TableReader, value: str | int) -> int:
    if isinstance(value, int):
        return value
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise r.error("allow_users", f"no such user {value!r}") from None


def _gid(r: TableReader, key: str, value: str | int) -> int:
    if isinstance(value, int):
        return value
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise r.error(key, f"no such group {value!r}") from None


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
