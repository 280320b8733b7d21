"""`[proxy]` in the configuration: defaults, loopback only, clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.daemon.config import ConfigError, parse

PROFILE = {"default": {"account": "shop", "api_key": "key"}}


def config_with(proxy: dict[str, Any] | None, socket: str = "/run/gb/broker.sock") -> Any:
    data: dict[str, Any] = {"broker": {"socket": socket}, "profiles": PROFILE}
    if proxy is not None:
        data["proxy"] = proxy
    return parse(data, Path("/etc/geins-broker/config.toml")).proxy


def test_defaults() -> None:
    proxy = config_with(None)
    assert proxy.socket == Path("/run/gb/merchant.sock")
    assert proxy.tcp is None
    assert (proxy.profile, proxy.max_connections, proxy.max_body_size) == ("default", 256, 10 << 20)
    assert (proxy.upstream_timeout, proxy.header_timeout, proxy.idle_timeout) == (30, 10, 60)
    assert config_with(None, "/tmp/x/f.sock").socket == Path("/tmp/x/f.merchant.sock")


def test_listeners() -> None:
    assert config_with({"tcp": "127.0.0.1:8480"}).tcp == ("127.0.0.1", 8480)
    assert config_with({"tcp": "[::1]:8480"}).tcp == ("::1", 8480)
    off = config_with({"unix": False})
    assert off.socket is None
    assert not off.enabled
    assert config_with({"socket": "/run/gb/m.sock"}).socket == Path("/run/gb/m.sock")


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        ({"tcp": "0.0.0.0:8480"}, "proxy.tcp: must be 127.0.0.1:PORT or [::1]:PORT"),
        ({"tcp": "localhost:8480"}, "loopback only"),
        ({"tcp": "192.168.1.2:80"}, "loopback only"),
        ({"tcp": "127.0.0.1:99999"}, "loopback only"),
        ({"tcp": "[::]:8480"}, "loopback only"),
        ({"max_body_size": 0}, "proxy.max_body_size: must be at least 1"),
        ({"upstream_timeout": 0}, "proxy.upstream_timeout: must be more than 0"),
        ({"max_header_size": 100}, "proxy.max_header_size: must be at least 1024"),
        ({"socket": "/" + "x" * 120}, "proxy.socket: path is 121 bytes"),
        ({"colour": "blue"}, "proxy.colour: unknown key"),
    ],
)
def test_mistakes_are_named(proxy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_with(proxy)
