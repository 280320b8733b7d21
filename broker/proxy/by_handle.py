"""The proxy by handle: which customer session a request names, and its bearer.

A request names a session with `Geins-Broker-Session: <handle>` or, for an app with a
`proxy_cookie`, with that cookie (the header wins when both come). The app is the
`Geins-Broker-App` header's; without one, every app the caller may use (and whose
cookie it is, for a cookie) is tried in turn, in the config's order: a session id is
a keyed hash over the app and the handle, so this is one look-up per app, never a
guess, and a handle is found in its own app only. Who may use an app is the session
ops' rule (`SessionOps.may_use`), on both listeners.

Every way a handle can be wrong (malformed, unknown, ended, another app's) ends on one
path, the manager's long way, which tries every candidate app before it answers
`unknown_session`: the answer and the work are the same for "no such session" and
"not yours".

The bearer: `CustomerSessions.in_memory` without awaiting (the common case, like a
profile's), else `use` and `fresh` in a task; after a 401, `renew_rejected` (one
refresh of that session, through its single flight) and one retry. The handle is a
`Secret` from here on; nothing logs it (the access log has 8 hex digits of the
session id).
"""

from __future__ import annotations

from typing import Final

from broker.core.errors import Forbidden, UnknownApp, UnknownSession
from broker.core.secret import Secret
from broker.customers.live import Live
from broker.customers.manager import CustomerSessions
from broker.geins.protocol import Endpoint
from broker.policy.headers import ProxyRefusal, min_valid_for, refusal_for
from broker.rpc.peercred import Peer
from broker.rpc.session_ops import SessionOps

#: What the access log shows for a session before its app is known.
UNRESOLVED: Final = "-"


class CustomerRoute:
    """The session one request names (module docstring). Made on the reactor."""

    __slots__ = ("_handle", "app", "candidates", "customers", "live")

    def __init__(self, customers: CustomerSessions, candidates: tuple[str, ...], handle: str):
        self.customers = customers
        #: The apps to look in, in turn; `app` once the session is found.
        self.candidates = candidates
        self.app = candidates[0] if len(candidates) == 1 else UNRESOLVED
        self._handle = handle
        self.live: Live | None = None

    def __repr__(self) -> str:
        return f"CustomerRoute(app={self.app!r})"

    @classmethod
    def choose(
        cls,
        ops: SessionOps,
        peer: Peer,
        handle: bytes,
        named: bytes | None,
        cookie_apps: frozenset[str] | None,
    ) -> CustomerRoute:
        """The route for `handle`, in the app `named` (the Geins-Broker-App header) or
        in every app `peer` may use (only those in `cookie_apps`, when the handle came
        in a cookie). A ProxyRefusal for an unknown app or one `peer` may not use."""
        customers = ops.customers
        if named is not None:
            name = named.decode("latin-1")
            app = ops.apps.get(name)
            if customers is None or app is None or name not in customers.apps:
                raise _refusal(UnknownApp(f"no app {name!r} is configured"))
            if not ops.may_use(peer, app) or (cookie_apps is not None and name not in cookie_apps):
                raise _refusal(Forbidden(f"uid {peer.uid} may not use app {name!r}"))
            candidates: tuple[str, ...] = (name,)
        else:
            candidates = tuple(
                name
                for name, app in ops.apps.items()
                if customers is not None
                and name in customers.apps
                and (cookie_apps is None or name in cookie_apps)
                and ops.may_use(peer, app)
            )
        if customers is None or not candidates:
            raise _refusal(Forbidden(f"uid {peer.uid} may use no app with this session"))
        return cls(customers, candidates, handle.decode("latin-1"))

    @property
    def endpoint(self) -> Endpoint:
        return self.customers.apps[self.app].endpoint

    def bearer_now(self, now: float) -> str | None:
        """The bearer, if the session is in memory with enough time left; None: ask
        `bearer` (in a task)."""
        customers, handle = self.customers, self._handle
        for app in self.candidates:
            live = customers.in_memory(app, handle)
            if live is not None:
                self.app, self.live = app, live
                if live.expires_at - now >= min_valid_for(live.expires_at - live.obtained_at):
                    return live.bearer.reveal()
                return None
        return None

    async def bearer(self, rejected: str | None) -> str:
        """The bearer the long way: after renewing the session once if Geins refused
        `rejected`, with enough time left. Raises BrokerFault (`unknown_session` for a
        handle found in no candidate app)."""
        customers, live = self.customers, self.live
        if live is None:
            live = self.live = await self._find()
        elif rejected is not None:
            await customers.renew_rejected(live, rejected)
        await customers.fresh(live, min_valid_for(live.expires_at - live.obtained_at))
        return live.bearer.reveal()

    async def _find(self) -> Live:
        handle = Secret(self._handle)
        for app in self.candidates:
            try:
                live = await self.customers.use(app, handle)
            except UnknownSession:
                continue
            self.app = app
            return live
        raise UnknownSession()


def _refusal(fault: Forbidden | UnknownApp) -> ProxyRefusal:
    return refusal_for(fault.code, str(fault))
