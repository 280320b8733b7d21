"""Configuration: defaults, where files and sockets are, and errors that say exactly what."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import platformdirs
import pytest

from broker.daemon import config
from broker.daemon.config import ConfigError, find_config, load
from broker.daemon.config_metrics import MetricsConfig
from geins_broker_client.paths import candidate_sockets

GOOD = """
[profiles.default]
account = "myshop"
api_key = "key"
"""


APP = """
[apps.shop]
account = "myshop"
api_key = "key"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_minimal_config_and_defaults(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, GOOD))
    profile = loaded.profiles["default"]
    assert profile.endpoint.auth_base == "https://auth-service.geins.io/api/myshop_prod"
    assert profile.endpoint.sign_base == "https://merchantapi.geins.io/auth/sign/key?identity="
    assert profile.policy.refresh_at == 0.75
    assert loaded.max_connections == 1024
    assert loaded.socket.name == "broker.sock"
    assert loaded.state_dir == Path(platformdirs.user_state_dir("geins-broker"))


def test_several_profiles_and_settings(tmp_path: Path) -> None:
    text = (
        GOOD
        + """
[broker]
socket = "/tmp/x.sock"
state_dir = "/tmp/state"
max_connections = 10
socket_mode = "0660"
socket_group = 0

[profiles.other]
account = "b"
api_key = "k2"
environment = "qa"
refresh_at = 0.5
jitter = 0
allow_users = ["root", 1234]
allow_groups = [0]
"""
    )
    loaded = load(write(tmp_path, text))
    assert set(loaded.profiles) == {"default", "other"}
    other = loaded.profiles["other"]
    assert other.endpoint.auth_base.endswith("/api/b_qa")
    assert other.allow_uids == {0, 1234} and other.allow_gids == {0}
    assert (other.policy.refresh_at, other.policy.jitter) == (0.5, 0.0)
    assert (loaded.socket_mode, loaded.socket_group, loaded.max_connections) == (0o660, 0, 10)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("[profiles.default]\naccount = 'a'\n", "profiles.default.api_key", "is required"),
        (GOOD + "api_kye = 'x'\n", "profiles.default.api_kye", "unknown key"),
        (
            GOOD + "[broker]\nmax_connections = 'many'\n",
            "broker.max_connections",
            "expected a number, got str",
        ),
        (GOOD + "[broker]\nmax_connections = 0\n", "broker.max_connections", "at least 1"),
        (GOOD + "[broker]\nidle_timeout = true\n", "broker.idle_timeout", "got a boolean"),
        (
            GOOD + "auth_service_url = 'http://auth.example.com'\n",
            "profiles.default.auth_service_url",
            "HTTPS",
        ),
        (
            GOOD + "merchant_api_url = 'ftp://x'\n",
            "profiles.default.merchant_api_url",
            "http(s) URL",
        ),
        (GOOD + "refresh_at = 0.99\n", "profiles.default.refresh_at", "between 0.1 and 0.9"),
        (
            GOOD + "allow_users = ['no-such-user-here']\n",
            "profiles.default.allow_users",
            "no such user",
        ),
        (GOOD + "allow_groups = [true]\n", "profiles.default.allow_groups", "names or numeric ids"),
        (GOOD + "[broker]\nsocket_mode = '0644x'\n", "broker.socket_mode", "octal"),
        (GOOD + "[broker]\nsocket_mode = '0066'\n", "broker.socket_mode", "owner"),
        (GOOD + "[broker]\nsocket = '/" + "x" * 120 + "'\n", "broker.socket", "at most 107"),
        ("[profiles]\n", "profiles", "at least one profile"),
        # TOML's nan and inf are numbers, but no duration.
        (GOOD + "[broker]\ntoken_wait = nan\n", "broker.token_wait", "finite"),
        (GOOD + "[broker]\ntoken_wait = inf\n", "broker.token_wait", "finite"),
        (GOOD + "[broker]\nidle_timeout = -inf\n", "broker.idle_timeout", "finite"),
        (GOOD + "[broker]\nsend_timeout = 1e9\n", "broker.send_timeout", "at most 3600"),
        (GOOD + "[broker]\nstartup_spread = -0.5\n", "broker.startup_spread", "must be 0"),
        (GOOD + "request_timeout = nan\n", "profiles.default.request_timeout", "finite"),
        ("[profiles.'../etc']\naccount='a'\napi_key='k'\n", "profiles.../etc", "profile name"),
        ("color = 'blue'\n" + GOOD, "color", "unknown key"),
        ("[metrics]\ntextfile = 'm.prom'\n" + GOOD, "metrics.textfile", "absolute"),
        ("[metrics]\ntextfile = '/var/m.txt'\n" + GOOD, "metrics.textfile", ".prom"),
        ("[metrics]\ntextfile_interval = 0.5\n" + GOOD, "metrics.textfile_interval", "at least 1"),
        ("[metrics]\nper_profile = 'no'\n" + GOOD, "metrics.per_profile", "expected bool"),
        ("[metrics]\nport = 9100\n" + GOOD, "metrics.port", "unknown key"),
        (APP + "idle_short = 0\n", "apps.shop.idle_short", "more than 0"),
        (APP + "idle_remembered = inf\n", "apps.shop.idle_remembered", "finite"),
        (APP + "max_per_customer = 0\n", "apps.shop.max_per_customer", "at least 1"),
        (APP + "login_burst_per_uid = 0\n", "apps.shop.login_burst_per_uid", "at least 1"),
        (APP + "login_interval_per_username = 0\n", "apps.shop.login_interval", "more than 0"),
        (APP + "allow_users = ['no-such-user-here']\n", "apps.shop.allow_users", "no such"),
        (APP + "shared = true\n", "apps.shop.shared", "unknown key"),
        ("[apps.shop]\naccount = 'a'\n", "apps.shop.api_key", "required"),
        ("[apps.'a b']\naccount='a'\napi_key='k'\n", "apps.a b", "app name"),
    ],
)
def test_errors_name_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}")
    assert problem in message


def test_apps_with_their_defaults_and_settings(tmp_path: Path) -> None:
    """An app alone is a whole config (a storefront's broker needs no profile)."""
    loaded = load(write(tmp_path, APP))
    assert loaded.profiles == {}
    shop = loaded.apps["shop"]
    assert shop.settings.endpoint.auth_base == "https://auth-service.geins.io/api/myshop_prod"
    assert shop.settings.lifetime.idle_remembered == 7 * 86400
    assert shop.settings.lifetime.idle_short == 1800
    assert shop.settings.rates.per_username.per_second == 1 / 60
    assert shop.settings.rates.per_uid.burst == 100
    assert (shop.settings.max_refreshes, shop.settings.max_purges) == (32, 8)
    assert shop.allow_uids == frozenset()
    tuned = load(
        write(
            tmp_path,
            GOOD
            + APP
            + "channel_id = '1|se'\nallow_users = [1234]\nallow_groups = [55]\n"
            + "idle_short = 600\nidle_remembered = 86400\nactive_for = 120\n"
            + "max_sessions = 5000\nmax_per_customer = 3\n"
            + "login_burst_per_username = 3\nlogin_interval_per_username = 120\n"
            + "login_burst_per_uid = 50\nlogin_interval_per_uid = 0.5\n"
            + "max_refreshes = 4\nmax_purges = 2\nrefresh_at = 0.5\njitter = 0\n",
        )
    ).apps["shop"]
    settings = tuned.settings
    assert settings.endpoint.channel_id == "1|se"
    assert (tuned.allow_uids, tuned.allow_gids) == (frozenset({1234}), frozenset({55}))
    assert (settings.lifetime.idle_short, settings.lifetime.idle_remembered) == (600, 86400)
    assert settings.lifetime.active_for == 120
    assert (settings.lifetime.max_sessions, settings.lifetime.max_per_customer) == (5000, 3)
    assert settings.rates.per_username.burst == 3
    assert settings.rates.per_username.per_second == 1 / 120
    assert settings.rates.per_uid.per_second == 2.0
    assert (settings.max_refreshes, settings.max_purges) == (4, 2)
    assert (settings.policy.refresh_at, settings.policy.jitter) == (0.5, 0)


def test_an_apps_proxy_cookie_must_be_a_cookie_name(tmp_path: Path) -> None:
    assert load(write(tmp_path, APP)).apps["shop"].proxy_cookie is None
    cookie = load(write(tmp_path, APP + "proxy_cookie = '__Host-geins'\n")).apps["shop"]
    assert cookie.proxy_cookie == "__Host-geins"
    for bad in ("a b", "a;b", "a=b", "", "\u00e5"):
        with pytest.raises(ConfigError, match="proxy_cookie"):
            load(write(tmp_path, APP + f"proxy_cookie = {bad!r}\n"))


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[profiles.default\n"))
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "nope.toml")


def test_loopback_http_is_allowed_for_the_emulator(tmp_path: Path) -> None:
    loaded = load(write(tmp_path, GOOD + "auth_service_url = 'http://127.0.0.1:8080/'\n"))
    assert loaded.profiles["default"].endpoint.auth_service_url == "http://127.0.0.1:8080"


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit = write(tmp_path, GOOD)
    assert find_config(explicit) == explicit
    monkeypatch.setenv("GEINS_BROKER_CONFIG", "/from/env.toml")
    assert find_config() == Path("/from/env.toml")
    monkeypatch.delenv("GEINS_BROKER_CONFIG")
    user = Path(platformdirs.user_config_dir("geins-broker")) / "config.toml"
    if not config.SYSTEM_CONFIG.exists():
        with pytest.raises(ConfigError, match="no configuration file"):
            find_config()
    user.parent.mkdir(parents=True)
    user.write_text(GOOD)
    assert find_config() == user


def test_socket_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/geins-broker")
    assert config.default_socket() == Path("/run/geins-broker/broker.sock")
    monkeypatch.setenv("GEINS_BROKER_SOCKET", "/x/y.sock")
    assert config.default_socket() == Path("/x/y.sock")
    assert load(write(tmp_path, GOOD), socket_override="/o.sock").socket == Path("/o.sock")


@pytest.mark.parametrize("xdg", [None, "own", "missing"])
def test_client_finds_the_daemons_default_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xdg: str | None
) -> None:
    """The client has no platformdirs; its list of places must hold the daemon's choice."""
    if xdg == "own":
        runtime = tmp_path / "rt"
        runtime.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    elif xdg == "missing":
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "absent"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    assert str(config.default_socket()) in candidate_sockets()


def test_state_dir_from_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/geins-broker")
    assert config.default_state_dir() == Path("/var/lib/geins-broker")


def test_metrics_settings(tmp_path: Path) -> None:
    assert load(write(tmp_path, GOOD)).metrics == MetricsConfig()
    text = (
        "[metrics]\nper_profile = false\ntextfile = '/var/lib/m/g.prom'\ntextfile_interval = 60\n"
        "allow_users = ['root', 4242]\nallow_groups = [0]\n"
    )
    loaded = load(write(tmp_path, text + GOOD))
    assert loaded.metrics == MetricsConfig(
        per_profile=False,
        textfile=Path("/var/lib/m/g.prom"),
        textfile_interval=60.0,
        allow_uids=frozenset({0, 4242}),
        allow_gids=frozenset({0}),
    )


def test_runtime_dir_is_ours_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's runtime directory is computed, not platformdirs': every branch checked."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert config.runtime_dir() == xdg
    xdg.chmod(0o770)
    with pytest.raises(ConfigError, match=rf"^{xdg}: may be written by others \(mode 0770\)$"):
        config.runtime_dir()

    if os.path.isdir(f"/run/user/{os.geteuid()}"):
        return  # the fallback below is not reached on this machine
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.delenv("GEINS_BROKER_SOCKET", raising=False)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    fallback = tmp_path / f"runtime-{os.geteuid()}"
    assert config.runtime_dir() == fallback
    assert stat.S_IMODE(fallback.stat().st_mode) == 0o700
    fallback.chmod(0o777)  # as if someone else had made it first
    with pytest.raises(ConfigError, match=rf"^{fallback}: may be written by others"):
        config.runtime_dir()
    fallback.chmod(0o700)
    assert config.default_socket() == fallback / "geins-broker" / "broker.sock"


def test_socket_override_wins_over_the_files_socket(tmp_path: Path) -> None:
    """`serve --config C --socket S` with a `socket` in C: S, and no unknown-key error."""
    text = GOOD + '\n[broker]\nsocket = "/tmp/file.sock"\n'
    loaded = load(write(tmp_path, text), socket_override="/o.sock")
    assert loaded.socket == Path("/o.sock")
    assert loaded.proxy.socket == Path("/o.merchant.sock")  # beside the socket that won
    with pytest.raises(ConfigError, match=r"broker\.socket: expected a string"):
        load(write(tmp_path, GOOD + "\n[broker]\nsocket = 1\n"), socket_override="/o.sock")
