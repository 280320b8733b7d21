"""The customer-session ops (docs/protocol.md, "Customer sessions"), with who may call.

An app's users (admins, its `allow_users`, members of its `allow_groups`) may create,
use and end its sessions; listing an app's sessions and logging a customer out
everywhere are for admins. The app is checked first (`unknown_app`), then the caller
(`forbidden`), then the handle (`unknown_session`, whatever is wrong with it).

Handles arrive as `Secret`s (schemas.py) and leave only in the answer to the login or
register that made them; `sessions` lists 8 hex digits of a session's keyed id.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from broker.core.errors import Forbidden, UnknownApp
from broker.rpc.peercred import Peer
from geins_broker_client.protocol import Op

if TYPE_CHECKING:
    from broker.customers.manager import Created, CustomerSessions
    from broker.daemon.config_apps import AppConfig

Waiting = Callable[[Peer, dict[str, Any]], Awaitable[dict[str, Any]]]


class SessionOps:
    """The ops, over the daemon's `CustomerSessions` (None: no app is configured)."""

    def __init__(
        self,
        customers: CustomerSessions | None,
        apps: Mapping[str, AppConfig],
        is_admin: Callable[[Peer], bool],
    ) -> None:
        self.customers = customers
        #: Who may use each app; a reload replaces it (settings need a restart).
        self.apps = apps
        self._is_admin = is_admin
        self.waiting: dict[str, Waiting] = {
            Op.SESSION_LOGIN: self.login,
            Op.SESSION_REGISTER: self.register,
            Op.SESSION_TOKEN: self.token,
            Op.SESSION_INFO: self.info,
            Op.SESSION_PASSWD: self.passwd,
            Op.SESSION_LOGOUT: self.logout,
            Op.SESSIONS: self.sessions,
            Op.SESSION_END: self.end,
        }

    # -- access --------------------------------------------------------------------------

    def may_use(self, peer: Peer, app: AppConfig) -> bool:
        return (
            self._is_admin(peer)
            or peer.uid in app.allow_uids
            or peer.gid in app.allow_gids
            or not peer.groups.isdisjoint(app.allow_gids)
        )

    def may_use_any(self, peer: Peer) -> bool:
        """Whether `peer` may use some app (the proxy lets it connect for that)."""
        return self.customers is not None and any(
            self.may_use(peer, app) for app in self.apps.values()
        )

    def usable(self, peer: Peer, name: str) -> CustomerSessions:
        """The manager, once `name` is an app and `peer` may use it."""
        customers = self._manager(name)
        if not self.may_use(peer, self.apps[name]):
            raise Forbidden(f"uid {peer.uid} may not use app {name!r}")
        return customers

    def _administered(self, peer: Peer, name: str) -> CustomerSessions:
        customers = self._manager(name)
        if not self._is_admin(peer):
            raise Forbidden(
                f"only root and the broker's own user may list or end sessions (uid {peer.uid})"
            )
        return customers

    def _manager(self, name: str) -> CustomerSessions:
        customers = self.customers
        if customers is None or name not in customers.apps or name not in self.apps:
            raise UnknownApp(f"no app {name!r} is configured")
        return customers

    # -- the app's users ---------------------------------------------------------------------

    async def login(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        app = args["app"]
        created = await self.usable(peer, app).login(
            app, peer.uid, args["username"], args["password"], remember=args["remember"]
        )
        return _created(app, args["username"], created)

    async def register(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        app = args["app"]
        created = await self.usable(peer, app).register(
            app,
            peer.uid,
            args["username"],
            args["password"],
            remember=args["remember"],
            user=args["user"],
        )
        return _created(app, args["username"], created)

    async def token(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """The long way of `session_token` (dispatch.py answers most from memory)."""
        app = args["app"]
        served = await self.usable(peer, app).token(app, args["handle"], args["min_valid"])
        return {"token": served.token.reveal(), "expires_at": served.expires_at}

    async def info(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        app = args["app"]
        info = await self.usable(peer, app).info(app, args["handle"])
        return {
            "username": info.username,
            "customer_type": info.customer_type,
            "expires_at": info.expires_at,
            "session_ends_at": info.session_ends_at,
            "remember": info.remember,
        }

    async def passwd(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        app = args["app"]
        expires_at = await self.usable(peer, app).passwd(
            app, peer.uid, args["handle"], args["password"], args["new_password"]
        )
        return {"expires_at": expires_at}

    async def logout(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        app = args["app"]
        await self.usable(peer, app).logout(app, args["handle"])
        return {}

    # -- admins ----------------------------------------------------------------------------

    async def sessions(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        app = args["app"]
        listed = await self._administered(peer, app).sessions(app, args["username"])
        return {
            "sessions": [
                {
                    "session": entry.session,
                    "username": entry.username,
                    "created_at": entry.created_at,
                    "last_used_at": entry.last_used_at,
                    "ends_at": entry.ends_at,
                }
                for entry in listed
            ]
        }

    async def end(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        app = args["app"]
        ended = await self._administered(peer, app).end_customer(app, args["username"])
        return {"ended": ended}

    # -- status ----------------------------------------------------------------------------

    def status(self, peer: Peer) -> list[dict[str, Any]]:
        """Per-app counts for the apps `peer` may use (no handle, id or username)."""
        if self.customers is None:
            return []
        counts = self.customers.status()
        return [
            {"app": name, **counts[name]}
            for name, app in self.apps.items()
            if name in counts and self.may_use(peer, app)
        ]


def _created(app: str, username: str, created: Created) -> dict[str, Any]:
    return {
        "app": app,
        "handle": created.handle.reveal(),
        "username": username,
        "expires_at": created.expires_at,
        "session_ends_at": created.session_ends_at,
        "remember": created.remember,
    }
