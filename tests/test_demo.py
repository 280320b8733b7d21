"""`geins-broker demo`, run for real: the commands it prints work as printed."""

from __future__ import annotations

import signal
import subprocess
import time

from tests.support import GEINS_BROKER, Scrape


def test_demo_prints_commands_that_work_then_stops_on_ctrl_c() -> None:
    demo = subprocess.Popen(
        [*GEINS_BROKER, "demo", "--token-ttl", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while not lines or "press Ctrl-C" not in lines[-1]:
            assert time.monotonic() < deadline, lines
            line = demo.stdout.readline()
            assert line, f"the demo ended early: {lines}"
            lines.append(line.rstrip("\n"))
        start = next(i for i, line in enumerate(lines) if "try these" in line)
        commands = []
        for line in lines[start + 1 :]:
            if not line.startswith("    "):
                break  # the block ends where the demo's own lines resume
            commands.append(line.strip())
        assert commands[0].startswith("export GEINS_BROKER_SOCKET=/tmp/gb-demo-")
        names = ["status", "token", "user", "watch", "metrics", "status --check"]
        for name, command in zip(names, commands[1:], strict=False):
            assert f"geins-broker {name}" in command
        assert "from geins_broker_client import Client" in commands[-1]

        def run(command: str) -> str:
            script = f"{commands[0]}\n{command}"  # the comments are bash comments
            result = subprocess.run(
                ["bash", "-c", script], capture_output=True, text=True, timeout=30, check=False
            )
            assert result.returncode == 0, (command, result.stderr)
            return result.stdout

        assert "active" in run(commands[1])
        assert run(commands[2]).startswith("eyJ")
        assert "demo" in run(commands[3])
        assert (
            Scrape(run(commands[5]))(
                "geins_broker_session_state", state="active", profile="default"
            )
            == 1
        )
        assert run(commands[6]) == "healthy: 1 profile active\n0\n"
        profile, left, unit = run(commands[-1]).split(" ", 2)
        assert (profile, unit) == ("default", "s left\n")
        assert 0 < int(left) <= 30
    finally:
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    assert demo.returncode == 0, err
    assert "stopped (daemon exit 0, emulator exit 0)" in out
