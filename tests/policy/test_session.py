"""The rotation policy and session states, as plain arithmetic: no trio, no sockets."""

from __future__ import annotations

import base64
import json
import tempfile

import pytest

from broker.core.errors import MalformedAnswer
from broker.core.secret import Secret
from broker.geins.protocol import Grant
from broker.policy.session import (
    END_SESSION,
    EXP_ALLOWANCE,
    REFRESH,
    WAIT,
    Policy,
    Saved,
    Session,
    SleepUntil,
    State,
    Tokens,
)
from tests.support import Fraction

T0 = 1_800_000_000.0


def jwt(exp: float, iat: float | None = None, **claims: object) -> str:
    payload = {"exp": int(exp), **({"iat": int(iat)} if iat is not None else {}), **claims}
    body = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    return f"h.{body}.s"


def grant(
    now: float, lifetime: float = 900, max_age: int | None = 1800, refresh: str = "r1"
) -> Grant:
    return Grant(Secret(jwt(now + lifetime, now)), Secret(refresh), max_age)


def session(at: float = 0.5, **policy: float) -> Session:
    return Session("default", Policy(**policy), Fraction(at))


def test_tokens_take_lifetime_from_the_jwt_not_constants() -> None:
    tokens = Tokens.from_grant(grant(T0, lifetime=120), T0)
    assert tokens.lifetime == 120
    assert tokens.session_expires_at == T0 + 1800


def test_iat_corrects_for_clock_skew() -> None:
    # Geins' clock is an hour ahead of ours: exp looks far away, but lasts 900 s.
    skewed = Grant(Secret(jwt(T0 + 3600 + 900, T0 + 3600)), Secret("r"), None)
    tokens = Tokens.from_grant(skewed, T0)
    assert tokens.expires_at == T0 + 900
    assert tokens.session_expires_at is None


@pytest.mark.parametrize(
    ("exp", "iat", "problem"),
    [
        (60, 0, "issued -1800000000 s from this machine's clock"),  # the clock-skew rule
        (T0 + 900, T0 + 86400 + 1, "skew"),
        (T0 + 900, T0 - 86400 - 1, "skew"),
        (1e300, T0, "exp is not a time"),
        (T0 + 900, -5, "iat is not a time"),
        (T0 + 367 * 86400, T0, "at most 31622400 s"),
    ],
)
def test_absurd_times_and_skew_are_refused(exp: float, iat: float, problem: str) -> None:
    """A hostile upstream's JWT whose times no clock could give is an upstream error (the caller
    keeps the session it had), never a token served for years or for a minute."""
    with pytest.raises(MalformedAnswer, match=problem):
        Tokens.from_grant(Grant(Secret(jwt(exp, iat)), Secret("r"), None), T0)


def test_skew_up_to_a_day_is_accepted() -> None:
    """A host set to local time instead of UTC is off by whole hours; harmless, since the
    lifetime is counted from this machine's clock."""
    tokens = Tokens.from_grant(
        Grant(Secret(jwt(T0 - 50400 + 900, T0 - 50400)), Secret("r"), None), T0
    )
    assert tokens.expires_at == T0 + 900


def test_without_iat_exp_is_absolute() -> None:
    tokens = Tokens.from_grant(Grant(Secret(jwt(T0 + 600)), Secret("r"), None), T0)
    assert tokens.expires_at == T0 + 600


@pytest.mark.parametrize("bearer", ["not-a-jwt", jwt(T0 - 5), jwt(T0 + 60, T0, expired="true")])
def test_unusable_bearers_are_malformed_answers(bearer: str) -> None:
    with pytest.raises(MalformedAnswer):
        Tokens.from_grant(Grant(Secret(bearer), Secret("r"), None), T0)


def test_rotation_at_three_quarters_with_jitter() -> None:
    for at, expected in ((0.5, 675.0), (0.0, 630.0), (1.0, 720.0)):
        s = session(at)
        s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
        assert s.next_refresh_at is not None
        assert s.next_refresh_at == pytest.approx(T0 + expected)
        assert s.next_action(T0) == SleepUntil(s.next_refresh_at)
        assert s.next_action(T0 + expected) == REFRESH


def test_configured_refresh_point() -> None:
    s = session(0.5, refresh_at=0.5, jitter=0.0)
    s.logged_in(Tokens.from_grant(grant(T0, lifetime=100), T0), "ada", False, T0)
    assert s.next_refresh_at == T0 + 50


def state_of(s: Session) -> State:
    """The state now. mypy keeps what an `assert s.state is ...` narrowed across the
    transitions that change it, and would call the next such assert unreachable."""
    return s.state


def test_states() -> None:
    s = session()
    assert state_of(s) is State.LOGGED_OUT
    assert s.next_action(T0) == WAIT
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    assert state_of(s) is State.ACTIVE
    s.refresh_failed("down", T0 + 700)
    assert state_of(s) is State.DEGRADED
    s.refreshed(Tokens.from_grant(grant(T0 + 701, refresh="r2"), T0 + 701), T0 + 701)
    assert state_of(s) is State.ACTIVE
    assert (s.refreshes, s.failures, s.last_error) == (1, 0, None)
    s.write_failed("disk full")
    assert state_of(s) is State.DEGRADED
    s.written()
    assert state_of(s) is State.ACTIVE
    s.refresh_rejected("rejected")
    assert state_of(s) is State.LOGIN_REQUIRED
    assert s.next_action(T0 + 702) == WAIT
    assert s.tokens is not None and s.tokens.refresh is None
    s.logged_out()
    assert state_of(s) is State.LOGGED_OUT


def test_serves_only_unexpired_tokens_with_enough_left() -> None:
    s = session()
    assert not s.serves(T0)
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    assert s.serves(T0 + 899.9)
    assert not s.serves(T0 + 900)
    assert s.serves(T0 + 800, min_valid=100)
    assert not s.serves(T0 + 800.1, min_valid=100)


def test_rejected_bearer_is_served_until_it_expires() -> None:
    s = session()
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    s.refresh_rejected("gone")
    assert s.serves(T0 + 800)
    assert not s.serves(T0 + 900)


def test_backoff_is_exponential_capped_with_full_jitter() -> None:
    s = session(1.0)  # the top of each jitter range
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    delays = [s.refresh_failed("down", T0) for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    low = session(0.25)
    low.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    assert [low.refresh_failed("down", T0) for _ in range(3)] == [0.25, 0.5, 1.0]


def test_retry_after_is_honoured() -> None:
    s = session(1.0)
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    assert s.refresh_failed("429", T0, retry_after=30) == 30
    assert s.next_refresh_at == T0 + 30
    assert s.refresh_failed("429", T0 + 30, retry_after=0.5) == 2  # backoff is larger


@pytest.mark.parametrize("retry_after", [99_999_999.0, float("inf"), float("nan"), -5.0])
def test_retry_after_is_capped_at_the_backoff_ceiling(retry_after: float) -> None:
    """An upstream's Retry-After never parks the session for years."""
    s = session(0.0)  # no jitter of our own: whatever waits longer comes from Geins
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    delay = s.refresh_failed("429", T0 + 675, retry_after=retry_after)
    assert delay == (60.0 if 0 < retry_after < float("inf") else 0.0)
    assert s.next_refresh_at == T0 + 675 + delay


def test_an_expiring_bearer_brings_a_retry_forward() -> None:
    s = session(1.0)
    s.logged_in(Tokens.from_grant(grant(T0, lifetime=900), T0), "ada", False, T0)
    assert s.refresh_failed("429", T0 + 880, retry_after=60) == 20
    assert s.next_refresh_at == T0 + 900  # the bearer's expiry, not T0 + 940
    # Once it has expired the backoff is plain (nothing left to protect).
    assert s.refresh_failed("429", T0 + 900, retry_after=60) == 60


def test_a_session_shorter_than_the_bearer_is_refreshed_in_time() -> None:
    s = session(0.5)
    s.logged_in(Tokens.from_grant(grant(T0, lifetime=3600, max_age=1800), T0), "ada", False, T0)
    assert s.next_refresh_at == T0 + 1350  # 0.75 of the 30-minute session, not of the hour


def test_session_lifetime_ends_the_session() -> None:
    s = session()
    s.logged_in(Tokens.from_grant(grant(T0, max_age=600), T0), "ada", False, T0)
    assert s.next_action(T0 + 599) == REFRESH
    s.refresh_failed("down", T0 + 599, retry_after=300)
    assert s.next_action(T0 + 600) == END_SESSION
    s.session_ended()
    assert s.state is State.LOGIN_REQUIRED


def test_demand_refresh_respects_backoff() -> None:
    s = session()
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    s.demand_refresh(T0 + 10)
    assert s.next_refresh_at == T0 + 10
    s.refresh_failed("down", T0 + 10)
    backoff = s.next_refresh_at
    s.demand_refresh(T0 + 10.1)
    assert s.next_refresh_at == backoff


def test_a_reader_brings_a_refresh_forward_at_most_once_per_interval() -> None:
    """A reader cannot drive a refresh storm: readers get a per-profile minimum interval between the
    refreshes they cause; admins do not."""
    s = session(0.5, reader_refresh_interval=30)
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    assert s.demand_refresh(T0 + 100, reader=True) == T0 + 100
    s.refreshed(Tokens.from_grant(grant(T0 + 100), T0 + 100), T0 + 100)
    assert s.demand_refresh(T0 + 101, reader=True) == T0 + 130
    assert s.next_refresh_at == T0 + 130
    assert s.demand_refresh(T0 + 102) == T0 + 102  # an admin is not held back


def test_a_clock_stepped_back_holds_readers_off_for_one_interval_only() -> None:
    s = session(0.5, reader_refresh_interval=30)
    s.logged_in(Tokens.from_grant(grant(T0 + 3600), T0 + 3600), "ada", False, T0 + 3600)
    assert s.demand_refresh(T0 + 3700, reader=True) == T0 + 3700
    s.refreshed(Tokens.from_grant(grant(T0 + 3700), T0 + 3700), T0 + 3700)
    # NTP steps the clock back an hour: the next reader's refresh is 30 s away, not 3630.
    assert s.demand_refresh(T0 + 100, reader=True) == T0 + 130


def test_every_ended_attempt_is_counted() -> None:
    s = session()
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    s.refreshed(Tokens.from_grant(grant(T0 + 1), T0 + 1), T0 + 1)
    s.refresh_failed("down", T0 + 2)
    s.refresh_rejected("gone")
    assert s.attempts == 3


def test_startup_spread_only_moves_overdue_refreshes() -> None:
    s = session(0.5)
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    s.defer_startup_refresh(T0 + 100, spread=10)
    assert s.next_refresh_at == T0 + 675
    s.defer_startup_refresh(T0 + 1000, spread=10)
    assert s.next_refresh_at == T0 + 1005


def test_repr_holds_no_token() -> None:
    s = session()
    s.logged_in(Tokens.from_grant(grant(T0, refresh="refresh-secret"), T0), "ada", False, T0)
    assert "refresh-secret" not in repr(s)
    assert "refresh-secret" not in repr(s.tokens)
    assert s.tokens is not None and s.tokens.bearer.reveal() not in repr(s.tokens)


#: Every field a Session shows; each is read-only from outside.
SESSION_FIELDS = {
    "profile",
    "policy",
    "username",
    "remember",
    "tokens",
    "login_required",
    "next_refresh_at",
    "last_refresh_at",
    "refreshes",
    "attempts",
    "reader_demand_at",
    "failures",
    "last_error",
    "store_error",
    "sealed",
    "revision",
}


def test_no_field_of_a_session_can_be_assigned_from_outside() -> None:
    s = session()
    s.logged_in(Tokens.from_grant(grant(T0), T0), "ada", False, T0)
    public = {name for name in dir(s) if not name.startswith("_")}
    assert public >= SESSION_FIELDS
    for name in sorted(public):
        before = getattr(s, name)
        with pytest.raises(AttributeError):
            setattr(s, name, before)
    with pytest.raises(AttributeError):
        s.invented = 1


def test_mypy_sees_every_field_of_a_session_as_read_only() -> None:
    """The fields are read-only to the type checker too, not only at run time."""
    mypy_api = pytest.importorskip("mypy.api")
    lines = ["from broker.policy.session import Session", "s = Session('p')"]
    lines += [f"s.{name} = s.{name}" for name in sorted(SESSION_FIELDS)]
    with tempfile.TemporaryDirectory() as cache:
        out, _, status = mypy_api.run(
            [
                *("--config-file", "", "--strict", "--cache-dir", cache),
                *("--follow-imports", "silent", "-c", "\n".join(lines)),
            ]
        )
    assert status == 1, out
    read_only = {line.split('"')[1] for line in out.splitlines() if "is read-only" in line}
    assert read_only == SESSION_FIELDS, out


def test_every_transition_bumps_the_revision() -> None:
    s = session()
    seen = [s.revision]

    def bumped() -> None:
        assert s.revision > seen[-1]
        seen.append(s.revision)

    tokens = Tokens.from_grant(grant(T0), T0)
    s.logged_in(tokens, "ada", False, T0)
    bumped()
    s.refresh_token_replaced(Secret("r2"))
    bumped()
    assert s.tokens is not None and s.tokens.refresh is not None
    assert s.tokens.refresh.reveal() == "r2"
    s.write_failed("disk full")
    bumped()
    s.written()
    bumped()
    s.found_sealed("no key")
    bumped()
    assert s.state is State.SEALED
    s.unsealed()
    bumped()
    s.refresh_failed("down", T0 + 700)
    bumped()
    saved = Saved(tokens, "bea", True, True, T0, 3)
    s.adopted(saved, T0 + 1, "refused")
    bumped()
    assert (s.username, s.failures, s.last_error, s.state) == (
        "bea",
        0,
        "refused",
        State.LOGIN_REQUIRED,
    )
    s.restored(Saved(tokens, "ada", False, False, None, 0))
    bumped()
    assert state_of(s) is State.ACTIVE
    s.refresh_rejected("rejected")
    bumped()
    s.logged_out()
    bumped()


def test_a_restored_bearer_is_never_served_past_its_jwts_exp() -> None:
    """A record's times are its word (a replayed fleet record is rebased to look fresh):
    the JWT's exp, which Geins signed, bounds them."""
    fresh = Tokens.from_grant(grant(T0, lifetime=120), T0)
    # The same tokens as a replay presents them an hour later: times shifted to now.
    later = T0 + 3600
    replayed = Tokens(
        fresh.bearer,
        fresh.refresh,
        fresh.claims,
        obtained_at=later,
        expires_at=later + 120,
        session_expires_at=None,
    )
    s = session()
    s.restored(Saved(replayed, "u", False, False, None, 0))
    assert not s.serves(later + 1)
    assert s.tokens is not None and s.tokens.expires_at == T0 + 120 + EXP_ALLOWANCE
