"""`geins-broker metrics` and `status --check`, run for real against a real daemon.

Real processes and real time: every wait is short, and assertions are about values and
exit codes, never durations.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.support import CliStack, cli_stack
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    GEINS_BROKER,
    Scrape,
)


class Setup(CliStack):
    @property
    def textfile(self) -> Path:
        """The daemon's metrics textfile (the fixture's config puts it there)."""
        return self.socket.parent / "geins_broker.prom"

    def metrics(self) -> Scrape:
        result = self.run("metrics")
        assert result.returncode == 0, result.stderr
        return Scrape(result.stdout)

    def check(self) -> tuple[int, str]:
        result = self.run("status", "--check")
        assert result.stderr == ""
        return result.returncode, result.stdout


@pytest.fixture
def setup(short_tmp: Path) -> Iterator[Setup]:
    textfile = short_tmp / "geins_broker.prom"
    metrics = {"textfile": str(textfile), "textfile_interval": 1}
    with cli_stack(short_tmp, ("--token-ttl", "60"), metrics=metrics) as stack:
        yield Setup(stack.emulator, stack.daemon, stack.socket)


def test_metrics_and_check_through_a_sessions_life(setup: Setup) -> None:
    assert setup.check() == (4, "not logged in: default (logged out)\n")
    assert (
        Scrape(setup.textfile.read_text())(
            "geins_broker_session_state", profile="default", state="logged_out"
        )
        == 1
    )

    login = setup.run("login", "-u", DEMO_USER, "--password-stdin", stdin=DEMO_PASSWORD + "\n")
    assert login.returncode == 0, login.stderr
    assert setup.check() == (0, "healthy: 1 profile active\n")
    for _ in range(3):
        assert setup.run("token").returncode == 0
    m = setup.metrics()
    assert m("geins_broker_session_state", profile="default", state="active") == 1
    assert m("geins_broker_upstream_requests_total", route="login", status_class="2xx") == 1
    assert m("geins_broker_token_requests_total", profile="default", result="memory") == 3
    assert m("geins_broker_connections") == 1  # the scrape itself

    assert setup.run("refresh").returncode == 0
    m = setup.metrics()
    assert m("geins_broker_refresh_total", profile="default", result="ok") == 1
    assert m("geins_broker_refresh_duration_seconds_count") == 1

    setup.emulator.control("POST", "faults", {"kind": "status", "status": 503, "match": "GET /api"})
    assert setup.run("refresh").returncode == 7  # Geins unavailable
    code, line = setup.check()
    assert code == 1
    assert line.startswith("degraded: default (Geins failed the refresh (503)")
    m = setup.metrics()
    # The operator's refresh, and perhaps a scheduled retry since.
    assert m("geins_broker_refresh_total", profile="default", result="upstream_unavailable") >= 1
    assert m("geins_broker_upstream_requests_total", route="refresh", status_class="5xx") >= 1

    setup.emulator.control("DELETE", "faults")
    setup.emulator.control("POST", "revoke", {"username": DEMO_USER})
    setup.run("refresh")  # rejected, unless a scheduled retry got there first
    code, line = setup.check()
    assert code == 5
    assert line.startswith("login required: default (")
    m = setup.metrics()
    assert m("geins_broker_refresh_total", profile="default", result="rejected") == 1
    assert m("geins_broker_session_state", profile="default", state="login_required") == 1
    assert m("geins_broker_session_state", profile="default", state="active") == 0


def test_check_of_one_profile_and_of_no_daemon(setup: Setup, short_tmp: Path) -> None:
    result = setup.run("status", "--check", "--profile", "nope")
    assert result.returncode == 10
    assert "no profile 'nope'" in result.stderr
    gone = subprocess.run(
        [*GEINS_BROKER, "status", "--check", "--socket", str(short_tmp / "none.sock")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert gone.returncode == 3
