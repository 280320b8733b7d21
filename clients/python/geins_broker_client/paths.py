"""Where the daemon's socket is, without asking the daemon.

The order is the daemon's own: an explicit path, then $GEINS_BROKER_SOCKET, then the
places the daemon picks by default: the user's runtime directory (as platformdirs
computes it: $XDG_RUNTIME_DIR, /run/user/UID, or TMPDIR/runtime-UID), and last the
system service's socket. The client needs no platformdirs for this; a test keeps the two
lists in step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_SOCKET = "GEINS_BROKER_SOCKET"
APP_DIR = "geins-broker"
SOCKET_NAME = "broker.sock"
SYSTEM_SOCKET = f"/run/{APP_DIR}/{SOCKET_NAME}"


def candidate_sockets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every default location, most specific first."""
    env = os.environ if environ is None else environ
    uid = os.geteuid()
    tmp = env.get("TMPDIR") or env.get("TEMP") or env.get("TMP") or "/tmp"  # noqa: S108
    runtime_dirs = [env.get("XDG_RUNTIME_DIR"), f"/run/user/{uid}", f"{tmp}/runtime-{uid}"]
    paths = [f"{d}/{APP_DIR}/{SOCKET_NAME}" for d in runtime_dirs if d]
    paths.append(SYSTEM_SOCKET)
    return list(dict.fromkeys(paths))


def find_socket(explicit: str | os.PathLike[str] | None = None) -> str:
    """The socket to connect to: the first of the candidates that exists.

    When none exists the most likely one is returned, so the error that follows names a
    sensible path.
    """
    if explicit is not None:
        return os.fspath(explicit)
    if env_path := os.environ.get(ENV_SOCKET):
        return env_path
    candidates = candidate_sockets()
    return next((p for p in candidates if os.path.exists(p)), candidates[0])
