"""The listening socket: taken from systemd (socket activation) or made here.

Made here, it is bound with a umask that leaves it private from the first instant,
then given its mode (0600, or 0660 with a group). A missing directory is created 0700
(0750 with a group); an existing one is left as its owner made it, but used only if it
is a directory of ours (not a symlink) that neither group nor others may write: clients
trust a socket only under such a directory (docs/protocol.md, "Finding and trusting the
socket"), and a daemon that bound elsewhere would be refused by every one of them, or
worse, share the directory with someone who can replace its socket. A stale socket file
left by a crash is replaced; a live daemon on the same path is an error.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from geins_broker_client.trust import own_directory_problem

#: sd_listen_fds(3): passed sockets start at fd 3.
SD_LISTEN_FDS_START = 3


class ListenerError(Exception):
    pass


class UnsafeDirectory(ListenerError):
    """The socket's directory is not one to trust: a setup mistake, like a config error."""


@dataclass
class Listener:
    sock: socket.socket
    path: Path | None
    #: True when systemd owns the socket: it is not ours to unlink.
    activated: bool
    _inode: tuple[int, int] | None = None

    def close(self) -> None:
        """Close, and remove the socket file if it is still the one this daemon made."""
        self.sock.close()
        if self.activated or self.path is None or self._inode is None:
            return
        with contextlib.suppress(OSError):
            info = self.path.stat()
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()


def from_systemd(environ: Mapping[str, str] | None = None) -> Listener | None:
    """The socket systemd passed us, if it passed one to this very process."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or not env.get("LISTEN_FDS", "").isdigit():
        return None
    if int(env["LISTEN_FDS"]) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ListenerError("the socket systemd passed is not a Unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    address = sock.getsockname()
    path = Path(address) if isinstance(address, str) and address else None
    return Listener(sock, path, activated=True)


def bind(path: Path, mode: int = 0o600, group: int | None = None) -> Listener:
    directory = path.parent
    if not os.path.lexists(directory):
        # Ours to shape: private (0700), or 0750 with the clients' group.
        dir_mode = 0o750 if group is not None else 0o700
        try:
            directory.mkdir(mode=dir_mode, parents=True)
            directory.chmod(dir_mode)  # mkdir's mode is filtered by the umask
            if group is not None:
                os.chown(directory, -1, group)
        except OSError as exc:
            raise ListenerError(f"cannot create {directory}: {exc.strerror}") from None
    if (problem := own_directory_problem(directory)) is not None:
        raise UnsafeDirectory(f"{directory}: {problem}")
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    previous = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(previous)
    try:
        # Only when the group is not already the one the file was made with (our own
        # primary group, as a system unit's Group= gives it): a sandbox such as the
        # shipped unit's SystemCallFilter=~@privileged refuses chown even as a no-op.
        if group is not None and os.stat(path).st_gid != group:
            os.chown(path, -1, group)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot set up {path}: {exc.strerror}") from None
    info = path.stat()
    return Listener(sock, path, activated=False, _inode=(info.st_dev, info.st_ino))


def _clear_stale(path: Path) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left by a daemon that died
        return
    except OSError as exc:
        raise ListenerError(f"cannot check {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ListenerError(f"another broker is already listening at {path}")
