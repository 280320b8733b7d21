"""Account operations from the daemon's own user: login, register, password, logout.

Each is one exchange with Geins that replaces (or ends) the session. The profile that
runs them (profile.py) holds its upstream lock around each, and shields the ones that
rotate tokens: this module says what is exchanged and kept, not when it may run. The
new session is on disk before it is served; a session it replaces is logged out at
Geins afterwards, and locally it is over whatever Geins answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import trio

from broker.core.clock import WallClock
from broker.core.errors import (
    BrokerFault,
    GeinsError,
    LoginRequired,
    MalformedAnswer,
    NotLoggedIn,
    SessionSealed,
    UnusableGrant,
)
from broker.core.secret import Secret
from broker.fleet.link import Link
from broker.geins.protocol import Grant
from broker.observe.log import events
from broker.policy.session import Session, Tokens
from broker.sessions.geins_client import GeinsClient
from broker.sessions.persist import PendingWrite, record_of

log = events("broker.profile")


class AccountHost(Protocol):
    """What account operations need from the profile that runs them: the parts that
    change under them (a reload replaces the Geins client, fleet mode the link) and
    the profile's own reactions to a new session."""

    @property
    def geins(self) -> GeinsClient: ...

    @property
    def fleet(self) -> Link: ...

    def publish(self) -> None:
        """Tell watchers, waiters and the daemon that the session changed."""

    def plan(self) -> None:
        """Tell the scheduler when the profile next has something to do."""

    async def keep_rotated(self, refresh_token: Secret) -> None:
        """Keep a refresh token Geins rotated in an otherwise unusable answer."""


def sealed_error(name: str, session: Session) -> SessionSealed:
    return SessionSealed(
        f"profile {name!r} is sealed: {session.sealed}; bring the key back "
        "and reload (SIGHUP); the file is kept as it is"
    )


def no_session_error(name: str, session: Session) -> BrokerFault:
    """Why there is no token to give: sealed, a login needed, or logged out."""
    if session.sealed is not None:
        return sealed_error(name, session)
    if session.login_required:
        return LoginRequired(f"profile {name!r} needs a login: {session.last_error}")
    return NotLoggedIn(f"profile {name!r} is not logged in")


class Accounts:
    """One profile's account operations (the caller holds the profile's upstream lock)."""

    def __init__(
        self, name: str, session: Session, writes: PendingWrite, wall: WallClock, host: AccountHost
    ) -> None:
        self._name = name
        self._session = session
        self._writes = writes
        self._wall = wall
        self._host = host

    async def login(self, username: str, password: Secret, remember: bool) -> None:
        # Challenge, signature, login, and the logout of a session it replaces.
        grant = await self._host.geins.login(username, password, remember=remember)
        await self._took(grant, username, remember, "login")

    async def register(
        self, username: str, password: Secret, remember: bool, user: Mapping[str, Any] | None
    ) -> None:
        # Challenge, signature, register, commit, and the logout of a replaced session.
        grant = await self._host.geins.create_account(username, password)
        await self._took(grant, username, remember, "register")
        # The account exists and the session is saved whatever the commit does.
        await self._host.geins.commit_user(grant.bearer, user)

    async def change_password(self, password: Secret, new_password: Secret) -> None:
        session = self._session
        if session.tokens is None or session.tokens.refresh is None or session.username is None:
            raise no_session_error(self._name, session)
        # Geins voids the old tokens on success: a new refresh token is kept even when
        # the rest of the answer is unusable.
        try:
            grant = await self._host.geins.change_password(
                session.tokens.refresh, session.username, password, new_password
            )
        except UnusableGrant as exc:
            await self._host.keep_rotated(exc.refresh)
            raise
        try:
            await self._took(grant, session.username, session.remember, "password_changed")
        except MalformedAnswer:  # the bearer was refused
            await self._host.keep_rotated(grant.refresh)
            raise

    async def _took(self, grant: Grant, username: str, remember: bool, event: str) -> None:
        session, host = self._session, self._host
        now = self._wall.now()
        tokens = Tokens.from_grant(grant, now, session.policy.max_clock_skew)
        replaced = session.tokens
        record = record_of(session, tokens, username=username, remember=remember)
        await self._writes.save(record)
        await host.fleet.replaced(record)
        session.logged_in(tokens, username, remember, now)
        log.info(
            event, profile=self._name, username=username, expires_in=round(tokens.expires_at - now)
        )
        host.publish()
        host.plan()
        if replaced is not None and replaced.refresh is not None and event != "password_changed":
            await self._logout_upstream(replaced.refresh, "replaced")

    async def logout(self) -> None:
        session, host = self._session, self._host
        if session.tokens is None and not session.login_required:
            raise NotLoggedIn(f"profile {self._name!r} is not logged in")
        refresh_token = session.tokens.refresh if session.tokens else None
        session.logged_out()
        host.publish()
        with trio.CancelScope(shield=True):
            await self._writes.save(None)
            await host.fleet.replaced(None)
            host.plan()  # a failed delete is retried
            log.info("logged_out", profile=self._name)
            if refresh_token is not None:
                await self._logout_upstream(refresh_token, "logout")

    async def _logout_upstream(self, refresh_token: Secret, why: str) -> None:
        """Tell Geins the session is over. Locally it is over whatever Geins answers."""
        try:
            await self._host.geins.logout(refresh_token)
        except GeinsError as exc:
            log.warning("upstream_logout_failed", profile=self._name, why=why, reason=str(exc))

    def user(self) -> dict[str, Any]:
        """Who the session is logged in as, from the bearer's claims."""
        tokens = self._session.tokens
        if tokens is None:
            raise no_session_error(self._name, self._session)
        c = tokens.claims
        return {
            "profile": self._name,
            "user_id": c.user_id,
            "username": c.username,
            "customer_type": c.customer_type,
            "member_type": c.member_type,
            "member_id": c.member_id,
            "member_discount": c.member_discount,
            "expires_at": tokens.expires_at,
        }
