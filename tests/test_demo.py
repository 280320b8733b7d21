"""`geins-broker demo` as a user runs it: it logs in, shows the proxy, stops on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import time

from .support import DEMO_USER, GEINS_BROKER


def test_demo_reads_the_user_through_the_proxy() -> None:
    process = subprocess.Popen(
        [*GEINS_BROKER, "demo"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "-> " in line:
                break
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()
    output = "".join(lines)
    assert "curl -sS --unix-socket /tmp/gb-demo-" in output
    assert "merchant.sock" in output
    answer = lines[-1]
    assert '"getUser"' in answer
    assert DEMO_USER in answer
