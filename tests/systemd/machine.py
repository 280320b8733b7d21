"""A booted container: systemd as PID 1 under systemd-nspawn, and ways to work inside it.

`Machine.boot(root)` starts `systemd-nspawn --boot` on a read-only cached root with a
tmpfs overlay on top (--volatile=overlay: nothing a test does reaches the cache), no
network but its own loopback (--private-network), and no registration with a host
machined or a new scope (--register=no --keep-unit), since the host may run no systemd.
Commands run inside through `nsenter -a` into the container's PID 1, with a clean
environment, as root or (via setpriv) as a user of the container with that user's
groups. Every wait is bounded: a wedged container fails the test instead of hanging it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
COMMAND_TIMEOUT = 60.0
#: The environment of every command inside; nothing leaks in from the host.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "PIP_NO_INDEX": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}
_names = itertools.count()


class MachineError(AssertionError):
    """Something inside the container did not go as a test needed."""


class Machine:
    """One booted container. `run`, `systemctl`, `show` and `journal` work inside it."""

    def __init__(self, process: subprocess.Popen[bytes], name: str, console: Path) -> None:
        self.process = process
        self.name = name
        self.console = console
        self.leader = 0

    @classmethod
    def boot(cls, root: Path, workdir: Path, binds: Mapping[str, Path] = {}) -> Machine:
        """Boot `root`; `binds` maps paths inside to host files or directories, which
        appear there read-only."""
        name = f"gb-{os.getpid()}-{next(_names)}"
        console = workdir / f"{name}.console"
        argv = [
            "systemd-nspawn",
            f"--directory={root}",
            f"--machine={name}",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--volatile=overlay",
            "--console=passive",
            *(f"--bind-ro={host}:{inside}" for inside, host in binds.items()),
            "--boot",
        ]
        with console.open("wb") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        machine = cls(process, name, console)
        try:
            machine._wait_for_boot()
        except BaseException:
            machine.stop()
            raise
        return machine

    def _wait_for_boot(self) -> None:
        deadline = time.monotonic() + BOOT_TIMEOUT
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        state = ""
        # First nspawn's child has to become systemd (it forks and execs on the way),
        # then systemd has to answer on its private socket ("offline" until then).
        while state not in ("running", "degraded"):
            if self.process.poll() is not None:
                raise MachineError(
                    f"systemd-nspawn exited {self.process.returncode}:\n"
                    + self.console.read_text(errors="replace")[-3000:]
                )
            if time.monotonic() > deadline:
                raise MachineError(f"no running systemd in the container (last: {state!r})")
            pids = children.read_text().split() if children.exists() else []
            comm = Path(f"/proc/{pids[0]}/comm") if pids else None
            try:
                self.leader = int(pids[0]) if comm and comm.read_text().strip() == "systemd" else 0
            except OSError:
                self.leader = 0
            if self.leader:
                state = self.run(
                    ["systemctl", "is-system-running", "--wait"],
                    check=False,
                    timeout=max(1.0, deadline - time.monotonic()),
                ).stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.02)
        if state == "degraded":
            failed = self.systemctl("--failed", "--no-legend", check=False)
            raise MachineError(f"units failed at boot:\n{failed}")

    # -- commands ----------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str] | str,
        *,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside (a string goes to sh -c). `user` runs it as that user of
        the container, with the groups /etc/group gives them, like a login would."""
        command = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        home = "/root" if user is None else f"/home/{user}"
        environment = {**BASE_ENV, "HOME": home, "USER": user or "root", **(env or {})}
        full = ["env", "-i", *(f"{k}={v}" for k, v in environment.items())]
        full += ["nsenter", f"--target={self.leader}", "--all", "--"]
        if user is not None:
            full += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        full += command
        try:
            result = subprocess.run(
                full, input=input, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise MachineError(f"{shlex.join(command)} took over {timeout} s") from exc
        if check and result.returncode != 0:
            raise MachineError(
                f"{shlex.join(command)} exited {result.returncode}"
                + (f" (as {user})" if user else "")
                + f"\nstdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
            )
        return result

    def systemctl(
        self,
        *args: str,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> str:
        """systemctl inside; with `user`, `systemctl --user` as that user (pass their
        XDG_RUNTIME_DIR in `env`)."""
        argv = ["systemctl", *(["--user"] if user else []), *args]
        return self.run(argv, user=user, env=env, check=check).stdout

    def show(
        self,
        unit: str,
        *properties: str,
        user: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """`systemctl show` as a dict: what systemd itself knows about the unit."""
        props = (f"--property={p}" for p in properties)
        out = self.systemctl("show", unit, *props, user=user, env=env)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str | None = None, *, user_unit: bool = False) -> str:
        """The unit's journal, messages only (every unit's when `unit` is None)."""
        selector = [("--user-unit=" if user_unit else "--unit=") + unit] if unit else []
        return self.run(["journalctl", "--no-pager", "--output=cat", *selector]).stdout

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll `predicate` (real time, short steps) until it holds, or fail naming `what`."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise MachineError(f"timed out waiting for {what}")
            time.sleep(0.1)

    # -- stopping ----------------------------------------------------------------------

    def stop(self) -> None:
        """Power the container off (SIGTERM to nspawn asks PID 1 to shut down)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # nspawn leaves an empty mount-propagation directory behind.
        propagate = Path("/run/systemd/nspawn/propagate") / self.name
        if propagate.is_dir() and not os.path.ismount(propagate):
            with contextlib.suppress(OSError):
                propagate.rmdir()
