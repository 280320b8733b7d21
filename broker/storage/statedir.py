"""The state directory, opened so that no other user's path can redirect it, and locked.

Why a walk instead of `mkdir(parents=True)`: the daemon may run as root, and every
name on the way to its state directory is a place where another user could plant a
symbolic link or a directory of their own. So the path is opened one component at a
time, each with O_NOFOLLOW relative to the fd of the one before, and checked on the fd
that was opened (never on a path that could change between the check and the use):

- the state directory itself, and any component the daemon creates, must be a real
  directory owned by the daemon's uid and not writable by group or others (a readable
  one is tightened to 0700, as before);
- an existing ancestor must be owned by root or the daemon's uid, and not writable by
  group or others unless sticky (as /tmp is: there nobody can rename our entries);
- a symbolic link is followed only if it is an ancestor (never the state directory,
  whoever made it) and root or the daemon's uid owns it (`/var/run -> /run`); one that
  a stranger made is refused.

`open_trusted_dir` walks a directory the daemon does not own in the same way (the
textfile's directory, a key file's): every component, the last one included, is held
to the rule for ancestors, and the last one may not be a link either.

After that every file is opened relative to the directory's fd, with O_NOFOLLOW, so
a link planted inside later cannot redirect a write either.

The lock: an exclusive flock on `.lock` inside, held for the life of the process (the
fd is close-on-exec and released by the kernel when the process dies, even by kill -9).
A second daemon, or an offline `rekey`, finds it taken and stops with the holder's pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Final

from broker.core.errors import StateDirError

LOCK_NAME: Final = ".lock"
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Linux's own limit on links followed while resolving one path.
_MAX_LINKS: Final = 40


def open_private_dir(path: Path) -> int:
    """An fd of `path`, created 0700 (with missing parents) if absent, after the checks
    above; the caller closes it. Raises StateDirError naming the component at fault."""
    return _walk(path, create=True)


def open_trusted_dir(path: Path) -> int:
    """An fd of the existing directory `path`, reached through no link another uid made,
    every component of it owned by root or the daemon's uid and not writable by group or
    others unless sticky, the last not a link; the caller closes it. Raises
    StateDirError naming the component at fault (one missing included)."""
    return _walk(path, create=False)


def _walk(path: Path, *, create: bool) -> int:
    uid = os.geteuid()
    parts = list(Path(os.path.abspath(path)).parts[1:])
    walked = Path("/")
    fd = os.open("/", _DIR_FLAGS)
    links = 0
    try:
        while parts:
            name = parts.pop(0)
            here = walked / name
            child, created = _open_or_create(fd, name, here, create=create)
            if child is None and not parts:
                raise StateDirError(f"{here}: a symbolic link; it must be a real directory")
            if child is None:  # an ancestor that is a link we may follow
                links += 1
                if links > _MAX_LINKS:
                    raise StateDirError(f"{here}: too many levels of symbolic links")
                target = Path(os.path.normpath(walked / os.readlink(name, dir_fd=fd)))
                parts = list(target.parts[1:]) + parts
                root = os.open("/", _DIR_FLAGS)
                os.close(fd)
                fd, walked = root, Path("/")
                continue
            os.close(fd)
            fd, walked = child, here
            _check(here, os.fstat(fd), uid, own=create and (created or not parts))
        if create and stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o700)
    except OSError as exc:
        os.close(fd)
        raise StateDirError(f"{walked}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_or_create(parent: int, name: str, here: Path, *, create: bool) -> tuple[int | None, bool]:
    """The component's fd and whether we made it; (None, False) for a link owned by root
    or the daemon's uid (followed if it is not the last component)."""
    created = False
    for _ in range(3):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent), created
        except FileNotFoundError:
            if not create:
                raise StateDirError(f"{here}: no such directory") from None
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
                created = True
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise StateDirError(f"{here}: {exc.strerror}") from None
            info = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISLNK(info.st_mode):
                raise StateDirError(f"{here}: not a directory") from None
            if info.st_uid not in (0, os.geteuid()):
                raise StateDirError(
                    f"{here}: a symbolic link owned by uid {info.st_uid}, not followed"
                ) from None
            return None, False
    raise StateDirError(f"{here}: keeps changing while it is opened")


def _check(here: Path, info: os.stat_result, uid: int, *, own: bool) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if own:
        # The state directory itself, or one we created: ours alone.
        if info.st_uid != uid:
            raise StateDirError(f"{here}: owned by uid {info.st_uid}, not this daemon's ({uid})")
        if mode & 0o022:
            raise StateDirError(f"{here}: writable by group or others (mode {mode:04o})")
        return
    if info.st_uid not in (0, uid):
        raise StateDirError(
            f"{here}: owned by uid {info.st_uid}, who could replace the state directory"
        )
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise StateDirError(f"{here}: writable by group or others (mode {mode:04o})")


def lock(dir_fd: int, path: Path) -> int:
    """Take the state directory's lock for this process; the fd keeps it (close it to let
    go). Raises StateDirError naming the holder's pid when another process has it."""
    try:
        # Held open read-only: a file open for writing would keep the file system from
        # being remounted read-only, a fault the daemon otherwise rides out.
        flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(LOCK_NAME, flags, 0o600, dir_fd=dir_fd)
    except OSError as exc:
        raise StateDirError(f"{path / LOCK_NAME}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateDirError(f"{path / LOCK_NAME}: not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise StateDirError(f"{path}: in use by another geins-broker{who}") from None
        flags = os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        writer = os.open(LOCK_NAME, flags, dir_fd=dir_fd)
        try:
            os.write(writer, f"{os.getpid()}\n".encode())
        finally:
            os.close(writer)
    except OSError as exc:
        os.close(fd)
        raise StateDirError(f"{path / LOCK_NAME}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd
