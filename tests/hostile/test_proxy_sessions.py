"""The proxy by handle, attacked by other local uids over real sockets.

Inputs that cross a trust boundary: the caller's uid (the kernel's), the handle it
sends (Geins-Broker-Session or an app's cookie), the app it names (Geins-Broker-App),
and what goes on to Geins (the recording upstream shows it). NOBODY may use `shop`
and `taped`; READER only `outlet`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.proxy.sessions_stack import SessionStack, session_stack
from tests.support import DEMO_USER, NOBODY, READER, as_uid, call, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="another uid needs root")


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[SessionStack]:
    yield from session_stack(short_tmp)


def test_the_handle_and_its_cookie_never_reach_geins(stack: SessionStack) -> None:
    handle = stack.login("taped")
    nobody = as_uid(NOBODY)
    sent = [
        (f"Geins-Broker-Session: {handle}", "Geins-Broker-App: taped"),
        (f"Cookie: theme=dark; taped={handle}; lang=sv",),
        (f"Cookie: taped={handle}", "Cookie: theme=dark"),
        (f"Geins-Broker-Session: {handle}", f"Cookie: taped={handle}; __Host-geins=x"),
    ]
    for headers in sent:
        status, body = stack.curl(*headers, as_user=nobody)
        assert status == 200, body
    assert len(stack.recorder.seen) == len(sent)
    for seen in stack.recorder.seen:
        names = {name for name, _ in seen}
        assert "geins-broker-session" not in names and "geins-broker-app" not in names
        assert all(handle not in value for _, value in seen), seen
        assert dict(seen)["x-apikey"] == "demo-api-key"
        assert dict(seen)["authorization"].startswith("Bearer ")
    # Two session cookies (one planted by a sibling domain, say): neither is believed.
    status, body = stack.curl(f"Cookie: taped={handle}; taped=other", as_user=nobody)
    assert (status, body["errors"][0]["extensions"]["code"]) == (400, "bad_request")
    assert len(stack.recorder.seen) == len(sent)
    cookies = [dict(seen).get("cookie") for seen in stack.recorder.seen]
    # Other cookies pass; an app's proxy cookie (any app's) never does.
    assert cookies == [None, "theme=dark; lang=sv", "theme=dark", None]


@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_another_apps_uid_is_refused(stack: SessionStack, via: str) -> None:
    shop = stack.login("shop")
    outlet = stack.login("outlet")
    # READER may use only `outlet`: the shop's handle, naming the shop, is refused.
    status, body = stack.curl(
        f"Geins-Broker-Session: {shop}", "Geins-Broker-App: shop", via=via, as_user=as_uid(READER)
    )
    assert (status, body["errors"][0]["extensions"]["code"]) == (403, "forbidden")
    # Without naming it: looked up in READER's apps only, where it is not.
    status, body = stack.curl(f"Geins-Broker-Session: {shop}", via=via, as_user=as_uid(READER))
    assert (status, body["errors"][0]["extensions"]["code"]) == (401, "unknown_session")
    # NOBODY naming `outlet`, which it may not use.
    status, body = stack.curl(
        f"Geins-Broker-Session: {outlet}",
        "Geins-Broker-App: outlet",
        via=via,
        as_user=as_uid(NOBODY),
    )
    assert (status, body["errors"][0]["extensions"]["code"]) == (403, "forbidden")
    # A uid that may use no app (and read no profile) is turned away at the door.
    status, body = stack.curl(f"Geins-Broker-Session: {shop}", via=via, as_user=as_uid(65532))
    assert status == 403
    # The one it may use works.
    status, body = stack.curl(f"Geins-Broker-Session: {outlet}", via=via, as_user=as_uid(READER))
    assert status == 200 and body["data"]["getUser"]["email"] == DEMO_USER


def test_unknown_and_another_apps_handle_answer_alike(stack: SessionStack) -> None:
    theirs = stack.login("outlet")
    mine = stack.login("shop")
    stack.curl(f"Geins-Broker-Session: {mine}", as_user=as_uid(NOBODY))
    unknown = secrets.token_urlsafe(32)
    answers = [
        stack.curl(*headers, as_user=as_uid(NOBODY))
        for headers in (
            (f"Geins-Broker-Session: {unknown}",),
            (f"Geins-Broker-Session: {theirs}",),
            (f"Geins-Broker-Session: {unknown}", "Geins-Broker-App: shop"),
            (f"Geins-Broker-Session: {theirs}", "Geins-Broker-App: shop"),
            (f"Cookie: __Host-geins={theirs}",),
            ("Geins-Broker-Session: not a handle",),
        )
    ]
    status, body = answers[0]
    assert status == 401
    assert body["errors"][0]["extensions"] == {"code": "unknown_session", "status": 401}
    assert all(answer == answers[0] for answer in answers), answers
    # A session that ended answers the same.
    ended = stack.login("shop")
    assert call(stack.broker_socket, op="session_logout", app="shop", handle=ended)["ok"]
    assert stack.curl(f"Geins-Broker-Session: {ended}", as_user=as_uid(NOBODY)) == answers[0]


def test_the_access_log_shows_no_handle(stack: SessionStack) -> None:
    handle = stack.login("shop")
    assert stack.curl(f"Geins-Broker-Session: {handle}", as_user=as_uid(NOBODY))[0] == 200
    assert stack.curl(f"Cookie: __Host-geins={handle}", as_user=as_uid(NOBODY))[0] == 200
    unknown = secrets.token_urlsafe(32)
    assert stack.curl(f"Geins-Broker-Session: {unknown}", as_user=as_uid(NOBODY))[0] == 401
    pattern = r"event=request method=POST path=/graphql status=(\d+) .* app=(\S+) session=(\S+)"

    def lines() -> list[tuple[str, str, str]]:
        return re.findall(pattern, stack.daemon.log())

    wait_until(lambda: len(lines()) == 3, 5, "three access lines")
    (ok, app, session), (ok2, _, session2), (refused, _, none) = lines()
    assert (ok, ok2, refused, app) == ("200", "200", "401", "shop")
    assert re.fullmatch(r"[0-9a-f]{8}", session) and session2 == session
    assert none == "-"
    log = stack.daemon.log()
    assert handle not in log and unknown not in log
