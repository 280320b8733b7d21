"""Keep the daemon's memory (bearers, refresh tokens, the sealing key) to itself.

- prctl(PR_SET_DUMPABLE, 0), as ssh-agent does: the kernel then gives /proc/PID/mem,
  /proc/PID/environ and ptrace attach to root (CAP_SYS_PTRACE) only, not to other
  processes of the daemon's own uid, and writes no core dump.
- RLIMIT_CORE 0, soft and hard: no core file even if something makes the process
  dumpable again. The units say LimitCORE=0 as well; under them the limit is already
  0 and nothing is changed.

Either may fail (a seccomp filter, an exotic kernel): that is logged, never fatal,
because refusing to start would protect nothing the file modes do not already.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from typing import Final

from broker.observe.log import events

log = events("broker.hardening")

PR_SET_DUMPABLE: Final = 4
PR_GET_DUMPABLE: Final = 3


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def keep_memory_private() -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
        if (soft, hard) != (0, 0):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as exc:
        log.warning("core_limit_not_set", reason=str(exc))
    libc = _libc()
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("not_made_undumpable", errno=ctypes.get_errno())


def dumpable() -> bool:
    """What the kernel says about this process (for tests and status)."""
    return bool(_libc().prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
