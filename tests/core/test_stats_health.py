"""The pure parts of observability: plain-number counts and the health verdict."""

from __future__ import annotations

import pytest

from broker.core.stats import Counts, Histogram, status_class
from geins_broker_client.health import (
    DEGRADED,
    HEALTHY,
    LOGIN_REQUIRED,
    NOT_LOGGED_IN,
    judge,
)
from geins_broker_client.results import ProfileStatus

NOW = 1_800_000_000.0


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert histogram.count == 5
    assert histogram.total == pytest.approx(8.65)


def test_histogram_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.5))


def test_counts_per_label_tuple() -> None:
    counts = Counts("route", "status_class")
    counts.inc("refresh", "2xx")
    counts.inc("refresh", "2xx")
    counts.inc("refresh", "5xx")
    assert counts.get("refresh", "2xx") == 2
    assert counts.get("login", "2xx") == 0
    assert dict(counts.items()) == {("refresh", "2xx"): 2, ("refresh", "5xx"): 1}


@pytest.mark.parametrize(
    ("status", "expected"), [(204, "2xx"), (302, "3xx"), (429, "4xx"), (503, "5xx"), (0, "other")]
)
def test_status_class(status: int, expected: str) -> None:
    assert status_class(status) == expected


def profile(
    name: str, state: str, expires_in: float | None = 600, last_error: str | None = None
) -> ProfileStatus:
    return ProfileStatus(
        profile=name,
        state=state,
        username="ada@example.com",
        expires_at=None if expires_in is None else NOW + expires_in,
        next_refresh_at=None,
        last_refresh_at=None,
        refreshes=0,
        failures=0,
        last_error=last_error,
    )


def test_all_active_is_healthy() -> None:
    health = judge([profile("a", "active"), profile("b", "active")], NOW)
    assert (health.code, health.http_status) == (HEALTHY, 200)
    assert health.line() == "healthy: 2 profiles active"


def test_degraded_names_the_profile_and_why() -> None:
    health = judge(
        [profile("a", "active"), profile("b", "degraded", last_error="Geins failed (503)")], NOW
    )
    assert health.code == DEGRADED
    assert health.http_status == 200  # tokens still served
    assert health.line() == "degraded: b (Geins failed (503))"


def test_a_degraded_profile_whose_token_ran_out_says_so() -> None:
    health = judge([profile("a", "degraded", expires_in=-1, last_error="x")], NOW)
    assert health.reason == "a (token expired)"


def test_the_worst_profile_decides() -> None:
    profiles = [
        profile("a", "degraded", last_error="slow"),
        profile("b", "login_required", last_error="rejected"),
        profile("c", "logged_out", expires_in=None),
    ]
    health = judge(profiles, NOW)
    assert health.code == LOGIN_REQUIRED
    assert health.http_status == 503
    assert health.line() == "login required: b (rejected)"
    assert judge(profiles[::2], NOW).code == NOT_LOGGED_IN


def test_many_culprits_are_summarised_on_one_line() -> None:
    health = judge([profile(f"p{i}", "login_required", last_error="a\nb") for i in range(5)], NOW)
    assert health.reason == "p0 (a b); p1 (a b); p2 (a b) and 2 more"
    assert "\n" not in health.line()


def test_no_profiles_is_not_healthy() -> None:
    assert judge([], NOW).code == NOT_LOGGED_IN


def test_an_unknown_state_from_a_newer_daemon_counts_as_degraded() -> None:
    assert judge([profile("a", "sealed")], NOW).code == DEGRADED
