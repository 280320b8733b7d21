"""The `[cluster]` table: where the fleet's Redis is, who this node is, what is shared.

The store's password never sits in the TOML: a URL with a password in it is refused;
it comes from `password_file` (private to the daemon's uid) or from the systemd
credential `geins-broker-redis` in $CREDENTIALS_DIRECTORY. Sealing is mandatory for
shared profiles, so a `[cluster]` that shares a profile without a sealing key is an
error at start (broker/daemon/lifecycle.py, once the keys are loaded), not a refresh
token in clear in Redis. The table is read through `core.tables.TableReader`, as the
daemon's own tables are.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from broker.core.secret import Secret
from broker.core.tables import TableReader

CREDENTIAL: Final = "geins-broker-redis"
_SCHEMES: Final = ("redis", "rediss", "unix")
_NODE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    #: The Redis URL, without any password (see `display_url` for logs).
    url: str
    node: str
    password: Secret | None = field(default=None, repr=False)
    ca_file: Path | None = None
    lease_ttl: float = 15.0
    poll_interval: float = 2.0
    prefix: str = "geins-broker"
    #: Timeouts of one Redis command and of a connection attempt.
    command_timeout: float = 2.0

    @property
    def display_url(self) -> str:
        """The URL as logs and status show it: scheme, host, port, db; no user."""
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_cluster(
    r: TableReader, profiles: Mapping[str, bool | None]
) -> tuple[ClusterConfig, dict[str, bool]]:
    """The `[cluster]` table, and whether each profile is shared: `profiles` maps each
    name to its own `shared` key (None when it does not say), which wins over the
    table's `shared` (true, false, or a list of names)."""
    url = r.text("url")
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        raise r.error("url", "expected a redis://, rediss:// or unix:// URL")
    if parts.password is not None:
        raise r.error(
            "url",
            "holds a password: put it in password_file (mode 0600) or the systemd "
            f"credential {CREDENTIAL!r}, never in the configuration",
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise r.error("url", "names no host")
    password = _password(r)
    resolved = _shared(r, profiles)
    ca_file = r.get("ca_file", str)
    if ca_file is not None and parts.scheme != "rediss":
        raise r.error("ca_file", "only a rediss:// URL uses TLS")
    if ca_file is not None and not os.access(ca_file, os.R_OK):
        raise r.error("ca_file", f"cannot read {ca_file}")
    config = ClusterConfig(
        url=url,
        node=_node(r),
        password=password,
        ca_file=None if ca_file is None else Path(ca_file),
        lease_ttl=r.seconds("lease_ttl", 15.0, most=3600.0),
        poll_interval=r.seconds("poll_interval", 2.0, most=3600.0),
        prefix=r.text("prefix", "geins-broker"),
        command_timeout=r.seconds("command_timeout", 2.0, most=300.0),
    )
    if config.command_timeout * 2 >= config.lease_ttl:
        raise r.error("lease_ttl", "must be more than twice command_timeout")
    r.check_unknown()
    return config, resolved


def _shared(r: TableReader, profiles: Mapping[str, bool | None]) -> dict[str, bool]:
    shared_default = r.get("shared", (bool, list), True)
    if isinstance(shared_default, list):
        for name in shared_default:
            if name not in profiles:
                raise r.error("shared", f"no profile named {name!r}")
    resolved = {}
    for name, said in profiles.items():
        if said is not None:
            resolved[name] = said
        elif isinstance(shared_default, bool):
            resolved[name] = shared_default
        else:
            resolved[name] = name in shared_default
    return resolved


def _node(r: TableReader) -> str:
    node = r.text("node", socket.gethostname())
    if not _NODE.fullmatch(node):
        raise r.error("node", "a node name is 1-64 letters, digits, '_', '.', '-'")
    return node


def _password(r: TableReader) -> Secret | None:
    path_text = r.get("password_file", str)
    if path_text is None:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        candidate = Path(creds) / CREDENTIAL if creds else None
        if candidate is None or not candidate.exists():
            return None
        path = candidate
    else:
        path = Path(path_text)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise r.error("password_file", f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise r.error("password_file", f"{path} must be owned by this user and mode 0600")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    text = raw.decode(errors="replace").strip()
    if not text:
        raise r.error("password_file", f"{path} is empty")
    return Secret(text)
