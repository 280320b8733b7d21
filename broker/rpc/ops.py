"""The operations of protocol v1, with who may call them.

The daemon's own uid and root may do everything. A profile's `allow_users` and
`allow_groups` may read it: token, user, watch, and its line in status. An app's may
create, use and end its customers' sessions (session_ops.py). Everyone may say hello.
Everything else is refused with `forbidden`, `metrics` included: it names every
profile with its state and timings, which `status` shows a reader only for the profiles
it may read (monitoring that runs as another user reads the textfile or `/metrics`).

Each op returns the response's fields; the server adds the id and `ok`, and turns any
`BrokerFault` raised here into the error map.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import trio

from broker import __version__
from broker.core.errors import BrokerFault, Forbidden, UnknownOp, UnknownProfile
from broker.rpc.peercred import Peer
from broker.rpc.session_ops import SessionOps
from broker.sessions.profile import Profile, WatchEvent
from geins_broker_client.protocol import VERSION, Op

SERVER: Final = f"geins-broker/{__version__}"

Emit = Callable[[WatchEvent], Awaitable[None]]
#: The exposition text and its content type (metrics.py).
Render = Callable[[], Awaitable[tuple[str, str]]]


class Api:
    def __init__(
        self,
        profiles: Mapping[str, Profile],
        *,
        admin_uid: int | None = None,
        metrics: Render | None = None,
        sealing: Callable[[], str] | None = None,
    ) -> None:
        #: The daemon's live table of profiles (a reload changes it in place).
        self.profiles = profiles
        self._render_metrics = metrics
        #: Who may read the metrics besides admins: uids and gids (`[metrics]`).
        self.metrics_readers: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset())
        #: Whether sessions are sealed at rest, and with which key id (never the key).
        self.sealing = sealing
        self.admin_uids = frozenset({0, os.geteuid() if admin_uid is None else admin_uid})
        self.started_at = trio.current_time()
        #: Ops answered without waiting for anything.
        self.immediate: dict[str, Callable[[Peer, dict[str, Any]], dict[str, Any]]] = {
            Op.HELLO: self.hello,
            Op.STATUS: self.status,
            Op.USER: self.user,
        }
        #: Ops that may wait (on Geins, or on a refresh).
        self.waiting: dict[str, Callable[[Peer, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
            Op.TOKEN: self.token,
            Op.LOGIN: self.login,
            Op.LOGOUT: self.logout,
            Op.REFRESH: self.refresh,
            Op.CHANGE_PASSWORD: self.change_password,
            Op.REGISTER: self.register,
            Op.METRICS: self.metrics,
        }
        #: Customer sessions' ops; their manager is attached when apps are configured.
        self.session_ops = SessionOps(None, {}, self.is_admin)
        self.waiting.update(self.session_ops.waiting)

    # -- access --------------------------------------------------------------------------

    def is_admin(self, peer: Peer) -> bool:
        return peer.uid in self.admin_uids

    def may_read(self, peer: Peer, profile: Profile) -> bool:
        config = profile.config
        return (
            self.is_admin(peer)
            or peer.uid in config.allow_uids
            or peer.gid in config.allow_gids
            or not peer.groups.isdisjoint(config.allow_gids)
        )

    def may_scrape(self, peer: Peer) -> bool:
        """Whether `peer` may read the metrics and the health verdict."""
        uids, gids = self.metrics_readers
        return (
            self.is_admin(peer)
            or peer.uid in uids
            or peer.gid in gids
            or not peer.groups.isdisjoint(gids)
        )

    def readable_profile(self, peer: Peer, name: str) -> Profile:
        profile = self._profile(name)
        if not self.may_read(peer, profile):
            raise Forbidden(f"uid {peer.uid} may not read profile {name!r}")
        return profile

    def administrable(self, peer: Peer, name: str) -> Profile:
        profile = self._profile(name)
        if not self.is_admin(peer):
            raise Forbidden(
                f"only root and the broker's own user may change sessions (uid {peer.uid})"
            )
        return profile

    def _profile(self, name: str) -> Profile:
        profile = self.profiles.get(name)
        if profile is None:
            raise UnknownProfile(f"no profile {name!r} is configured")
        return profile

    # -- immediate ops ---------------------------------------------------------------------

    def hello(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        return {"v": VERSION, "server": SERVER, "ops": list(Op.ALL)}

    def status(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        answer = {
            "server": SERVER,
            "uptime": trio.current_time() - self.started_at,
            "profiles": [p.status() for p in self.profiles.values() if self.may_read(peer, p)],
        }
        if self.sealing is not None:
            answer["sealing"] = self.sealing()
        if self.session_ops.customers is not None:
            answer["apps"] = self.session_ops.status(peer)
        return answer

    def user(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        return self.readable_profile(peer, args["profile"]).user()

    # -- ops that wait ---------------------------------------------------------------------

    async def token(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """The long way of a `token` request (server.py answers most from memory)."""
        profile = self._profile(args["profile"])
        try:
            if not self.may_read(peer, profile):
                raise Forbidden(f"uid {peer.uid} may not read profile {profile.name!r}")
            await profile.ensure_token(args["min_valid"], reader=not self.is_admin(peer))
        except BrokerFault as exc:
            profile.token_results.inc(exc.code)
            raise
        profile.token_results.inc("waited")
        tokens = profile.session.tokens
        assert tokens is not None
        return profile.token_fields(tokens)

    async def login(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        profile = self.administrable(peer, args["profile"])
        await profile.login(args["username"], args["password"], args["remember"])
        return self._session(profile)

    async def register(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        profile = self.administrable(peer, args["profile"])
        await profile.register(args["username"], args["password"], args["remember"], args["user"])
        return self._session(profile)

    async def logout(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        profile = self.administrable(peer, args["profile"])
        await profile.logout()
        return {"profile": profile.name}

    async def refresh(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        profile = self.administrable(peer, args["profile"])
        await profile.refresh_now()
        return self._session(profile)

    async def change_password(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        profile = self.administrable(peer, args["profile"])
        await profile.change_password(args["password"], args["new_password"])
        return self._session(profile)

    async def metrics(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        if not self.may_scrape(peer):
            raise Forbidden(f"uid {peer.uid} may not read the metrics (see [metrics] allow_users)")
        if self._render_metrics is None:
            raise UnknownOp("this daemon keeps no metrics")
        text, content_type = await self._render_metrics()
        return {"text": text, "content_type": content_type}

    @staticmethod
    def _session(profile: Profile) -> dict[str, Any]:
        tokens = profile.session.tokens
        assert tokens is not None
        return {
            "profile": profile.name,
            "username": profile.session.username,
            "expires_at": tokens.expires_at,
        }

    async def watch(self, peer: Peer, args: dict[str, Any], emit: Emit) -> None:
        profile = self.readable_profile(peer, args["profile"])

        async def emit_while_allowed(event: WatchEvent) -> None:
            # A reload may take this peer's access away while it watches.
            if not self.may_read(peer, profile):
                raise Forbidden(f"uid {peer.uid} may no longer read profile {profile.name!r}")
            await emit(event)

        await profile.watch(emit_while_allowed)


__all__ = ["Api", "Peer"]
