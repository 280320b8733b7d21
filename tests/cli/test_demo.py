"""`geins-broker demo` as a user runs it: it logs in, shows the proxy, prints commands that
work as printed, and stops on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import time

from tests.support import DEMO_USER, GEINS_BROKER, Scrape


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
