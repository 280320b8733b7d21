"""`geins-broker demo` as a user runs it: it logs in, shows the proxy, prints commands that
work as printed, and stops on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import time

import httpx
import pytest

from broker.cli.storefront_demo import DEMO_ORDERS, missing_node
from broker.emulator.model.service import DEMO_PASSWORD
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


@pytest.mark.skipif(missing_node() is not None, reason="the storefront demo needs Node and npm")
def test_demo_storefront_serves_a_login_that_works_then_stops_on_ctrl_c() -> None:
    demo = subprocess.Popen(
        [*GEINS_BROKER, "demo", "--storefront"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120  # the first run installs the example (npm ci)
        while not lines or "press Ctrl-C" not in lines[-1]:
            assert time.monotonic() < deadline, lines
            line = demo.stdout.readline()
            assert line, f"the demo ended early: {lines}"
            lines.append(line.rstrip("\n"))
        url = next(line.split()[1] for line in lines if line.strip().startswith("open http"))
        with httpx.Client(base_url=url, timeout=30) as shop:
            form = {"username": DEMO_USER, "password": DEMO_PASSWORD}
            refused = shop.post("/login", data=form, headers={"Origin": "https://evil.example"})
            assert refused.status_code == 403
            assert "set-cookie" not in refused.headers
            logged_in = shop.post("/login", data=form, headers={"Origin": url})
            assert logged_in.status_code == 303, logged_in.text
            cookie = logged_in.headers["set-cookie"]
            assert cookie.startswith("__Host-geins-session=")
            handle = cookie.split(";")[0].split("=", 1)[1]
            account = shop.get("/account", headers={"Cookie": f"__Host-geins-session={handle}"})
            assert account.status_code == 200
            assert DEMO_USER in account.text
            assert f"{DEMO_ORDERS} orders" in account.text
    finally:
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=30)
    assert demo.returncode == 0, err
    assert "stopping the storefront, the daemon and the emulator" in out
