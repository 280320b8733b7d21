"""Values several tables of the config file read alike: the bounds of durations, a Unix
socket's path, and users and groups given by name or by id.

Every table's reader (`config`, `config_profiles`, `config_apps`, `config_proxy`,
`config_metrics`) takes them from here, so that one key means one thing wherever it
appears.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import Final

from broker.core.tables import TableReader

#: Upper bounds for durations: generous, but a typo of a few zeros is caught.
HOUR: Final = 3600.0
DAY: Final = 86400.0
#: sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH: Final = 107


def check_socket_path(r: TableReader, key: str, path: os.PathLike[str]) -> None:
    """Refuse a socket path the kernel cannot bind, naming the key it came from."""
    if (length := len(os.fsencode(path))) > MAX_SOCKET_PATH:
        limit = f"a Unix socket path has at most {MAX_SOCKET_PATH}"
        raise r.error(key, f"path is {length} bytes; {limit}")


def allowed_uids(r: TableReader) -> frozenset[int]:
    """`allow_users`: user names or uids."""
    return frozenset(_uid(r, v) for v in _list(r, "allow_users"))


def allowed_gids(r: TableReader) -> frozenset[int]:
    """`allow_groups`: group names or gids."""
    return frozenset(gid(r, "allow_groups", v) for v in _list(r, "allow_groups"))


def gid(r: TableReader, key: str, value: str | int) -> int:
    """A group given by name or id; an unknown name is a mistake in `key`."""
    if isinstance(value, int):
        return value
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise r.error(key, f"no such group {value!r}") from None


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
