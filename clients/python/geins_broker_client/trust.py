"""Whether a socket is provably the daemon's, checked before a single byte is sent.

A client sends passwords (login, change_password, register) over the socket, so the
socket it reaches must belong to the daemon and not to another local user who bound a
look-alike under a directory they can write (`/tmp/runtime-0/...` when root runs without
XDG_RUNTIME_DIR). The rule, the same in every client (docs/protocol.md, "Finding and
trusting the socket"), trusts three uids: the client's own effective uid, root, and the
system service account `geins-broker` if it exists. Then:

1. the socket's directory (lstat: not a symlink) is a directory owned by a trusted uid
   that neither group nor others may write (mode & 0o022 == 0);
2. the socket file (lstat) is a socket owned by a trusted uid;
3. the process listening on it (SO_PEERCRED of the connected socket) runs as a trusted
   uid. Under systemd socket activation PID 1 made the listener, so the peer is root.

Rules 1 and 2 stand alone for a client that cannot read SO_PEERCRED: a directory only
trusted uids can write cannot hold an attacker's socket. Rule 3 also closes the race
in which a directory above is swapped between the lstat and the connect.

The rule is the three pure `*_problem` functions below (stat results and uids in, a
reason or None out); `path_problem` and `trusted_uids` are the small shell around them,
and `own_directory_problem` is the daemon's side of rule 1: it binds its socket (and
keeps its runtime directory) only where every client would trust it.
"""

from __future__ import annotations

import os
import pwd
import stat

TYPE_CHECKING = False  # no typing at run time: see calls.py
if TYPE_CHECKING:
    from collections.abc import Collection

#: The system service's account (systemd/geins-broker.service, sysusers.d).
SERVICE_USER = "geins-broker"

_WHO = "you, root or the geins-broker service"


def trusted_uids() -> frozenset[int]:
    """The uids whose socket this process may talk to."""
    try:
        service = pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:  # no system service on this machine
        service = 0
    return frozenset({os.geteuid(), 0, service})


def directory_problem(
    info: os.stat_result, trusted: Collection[int], who: str = _WHO
) -> str | None:
    """Why the socket's directory (from lstat) cannot be trusted, or None.

    `who` names the trusted uids in the reason (the daemon trusts only its own)."""
    if stat.S_ISLNK(info.st_mode):
        return "is a symlink"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid not in trusted:
        return f"is owned by uid {info.st_uid}, not by {who}"
    if info.st_mode & 0o022:
        return f"may be written by others (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def socket_problem(info: os.stat_result, trusted: Collection[int]) -> str | None:
    """Why the socket file (from lstat) cannot be trusted, or None."""
    if not stat.S_ISSOCK(info.st_mode):
        return "is a symlink" if stat.S_ISLNK(info.st_mode) else "is not a socket"
    if info.st_uid not in trusted:
        return f"is owned by uid {info.st_uid}, not by {_WHO}"
    return None


def peer_problem(uid: int, trusted: Collection[int]) -> str | None:
    """Why the process listening (its SO_PEERCRED uid) cannot be trusted, or None."""
    if uid not in trusted:
        return f"the process listening runs as uid {uid}, not as {_WHO}"
    return None


def path_problem(path: str, trusted: Collection[int] | None = None) -> str | None:
    """Rules 1 and 2 for `path`, as a reason naming the part at fault, or None.

    What does not exist yet is no problem here: connecting to it fails, and it cannot
    appear later under a directory that passed.
    """
    trusted = trusted_uids() if trusted is None else trusted
    directory = os.path.dirname(os.path.abspath(path))
    try:
        problem = directory_problem(os.lstat(directory), trusted)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"its directory {directory} cannot be checked ({exc.strerror})"
    if problem is not None:
        return f"its directory {directory} {problem}"
    try:
        problem = socket_problem(os.lstat(path), trusted)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return f"it cannot be checked ({exc.strerror})"
    return None if problem is None else f"it {problem}"


def own_directory_problem(path: str | os.PathLike[str]) -> str | None:
    """Why this process must not put its socket in the directory `path`, or None:
    rule 1 with only its own effective uid trusted (stricter than a client's three)."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        return f"cannot check ({exc.strerror})"
    uid = os.geteuid()
    return directory_problem(info, {uid}, who=f"the daemon's uid {uid}")
