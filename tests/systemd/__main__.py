"""Boot a container as the suite does and keep it up, for poking around by hand.

    sudo .venv/bin/python -m tests.systemd      # prints the nsenter command; Ctrl-C stops

The system service is deployed (docs/deployment.md steps 1-4) and the emulator runs on
127.0.0.1:8080 inside, exactly as the `system` fixture leaves them.
"""

from __future__ import annotations

import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .deploy import BUNDLE, SystemService, make_bundle
from .image import ensure_root
from .machine import BASE_ENV, Machine


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # still stop the container
    workdir = Path(tempfile.mkdtemp(prefix="geins-broker-systemd-"))
    machine = Machine.boot(ensure_root(), workdir, {BUNDLE: make_bundle(workdir / "bundle")})
    try:
        SystemService(machine).deploy()
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in BASE_ENV.items())
        print(
            f"container up; enter it with:\n  env -i {env} nsenter --target={machine.leader} "
            "--all -- bash\nCtrl-C stops it.",
            flush=True,
        )
        while machine.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        machine.stop()
        shutil.rmtree(workdir, ignore_errors=True)


main()
