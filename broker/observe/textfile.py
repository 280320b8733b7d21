"""The node_exporter textfile, written where no other user's path can redirect it.

The daemon may run as root, and the textfile's directory is often near node_exporter's
own files, where another uid could swap a directory for a link to a root-only one. So
each write opens the directory once, walked as the state directory is
(`statedir.open_trusted_dir`: no link another uid made, every component owned by root or
the daemon's uid and writable by no one else unless sticky, the directory itself no
link), and then makes the temporary file and renames it over the target relative to
that fd: nothing resolves the path twice.

The file is 0640 and given `textfile_group` (node_exporter's group), since the same
figures are refused to strangers by the `metrics` op; 0644 only when the config says
`textfile_public = true`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from broker.core.errors import StateDirError
from broker.storage.statedir import open_trusted_dir

PRIVATE_MODE: Final = 0o640
PUBLIC_MODE: Final = 0o644
_CREATE: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, slots=True)
class TextfileAccess:
    """Who may read the textfile: its group (None: the daemon's own), or everyone."""

    gid: int | None = None
    public: bool = False

    @property
    def mode(self) -> int:
        return PUBLIC_MODE if self.public else PRIVATE_MODE


class TextfileRefused(OSError):
    """The textfile's directory cannot be trusted; the message names the component."""


def write_textfile(path: Path, text: bytes, access: TextfileAccess | None = None) -> None:
    """Replace `path` with `text` atomically: node_exporter, reading at any moment,
    sees the old file or the new one, never a part.

    The temporary file is made in the same directory (a rename is atomic only within
    one file system) with O_EXCL under a name node_exporter ignores (it reads *.prom
    only), and renamed over the target: a link planted at `path` is replaced, never
    followed. Raises OSError (TextfileRefused for a directory not to be trusted); the
    caller logs it and tries again next time.
    """
    access = access or TextfileAccess()
    try:
        directory = open_trusted_dir(path.parent)
    except StateDirError as exc:
        raise TextfileRefused(errno.EPERM, f"refused, as {exc}") from None
    temporary = f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temporary, _CREATE, 0o600, dir_fd=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                if access.gid is not None:
                    os.fchown(handle.fileno(), -1, access.gid)
                os.fchmod(handle.fileno(), access.mode)
                handle.write(text)
            os.rename(temporary, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=directory)
            raise
    finally:
        os.close(directory)
