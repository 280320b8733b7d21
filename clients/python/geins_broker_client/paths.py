"""Where the daemon's socket is, without asking the daemon.

The order is the daemon's own: an explicit path, then $GEINS_BROKER_SOCKET, then the
places the daemon picks by default: the user's runtime directory ($XDG_RUNTIME_DIR,
/run/user/UID, or TMPDIR/runtime-UID, as broker.daemon.config.runtime_dir computes it), and
last the system service's socket. A test keeps the two lists in step.

Only a socket that passes the trust rule (trust.py) is chosen from the default places:
one under a directory another user can write is skipped, never connected to.
"""

from __future__ import annotations

import os

from .trust import path_problem

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

ENV_SOCKET = "GEINS_BROKER_SOCKET"
APP_DIR = "geins-broker"
SOCKET_NAME = "broker.sock"
SYSTEM_SOCKET = f"/run/{APP_DIR}/{SOCKET_NAME}"


def temp_dir(environ: Mapping[str, str] | None = None) -> str:
    """The directory holding the last-resort runtime directory, TMPDIR/runtime-UID."""
    env = os.environ if environ is None else environ
    return env.get("TMPDIR") or env.get("TEMP") or env.get("TMP") or "/tmp"  # noqa: S108


def candidate_sockets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Every default location, most specific first."""
    env = os.environ if environ is None else environ
    uid = os.geteuid()
    runtime_dirs = [
        env.get("XDG_RUNTIME_DIR"),
        f"/run/user/{uid}",
        f"{temp_dir(env)}/runtime-{uid}",
    ]
    paths = [f"{d}/{APP_DIR}/{SOCKET_NAME}" for d in runtime_dirs if d]
    paths.append(SYSTEM_SOCKET)
    return list(dict.fromkeys(paths))


def find_socket(explicit: str | os.PathLike[str] | None = None) -> str:
    """The socket to connect to: the first candidate that exists and may be trusted.

    When a candidate exists but fails the trust rule, the next one is tried; if none
    passes, the first that exists is returned, so that connecting to it fails with the
    reason (UntrustedSocket). When none exists the most likely one is returned, so the
    error that follows names a sensible path. An explicit path or $GEINS_BROKER_SOCKET
    is returned as it is: the client checks it like any other before it sends a byte.
    """
    if explicit is not None:
        return os.fspath(explicit)
    if env_path := os.environ.get(ENV_SOCKET):
        return env_path
    candidates = candidate_sockets()
    existing = [p for p in candidates if os.path.lexists(p)]
    trusted = next((p for p in existing if path_problem(p) is None), None)
    return trusted or (existing[0] if existing else candidates[0])
