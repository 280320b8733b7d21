"""The prepared `token` answer: the daemon's hot path, served from memory.

A `token` request that the held bearer satisfies is answered by splicing the request
id into bytes encoded once per change of the session (its `revision`), never by
encoding per request: one comparison of revisions, one of times, one splice.
"""

from __future__ import annotations

from typing import Any

from broker.policy.session import Session, Tokens
from geins_broker_client.protocol import PreparedResponse


def token_fields(name: str, tokens: Tokens) -> dict[str, Any]:
    """What a `token` answer (and a watch's token event) says."""
    return {
        "profile": name,
        "token": tokens.bearer.reveal(),
        "expires_at": tokens.expires_at,
    }


class TokenFrame:
    """One profile's encoded `token` answer, kept in step with its session.

    Keyed on `Session.revision`, which every transition that changes the served token
    or the state bumps: a logout, a rotation or a seal is never answered from a stale
    frame. Slots: the hot path reads these attributes on every request, and the C hot
    path (broker/rpc/_fastpath.c) reads them by name, `answer`'s checks written out.
    """

    __slots__ = ("_name", "_prepared", "_revision", "_serve_until", "_session", "served")

    def __init__(self, name: str, session: Session) -> None:
        self._name = name
        self._session = session
        self._prepared: PreparedResponse | None = None
        self._revision = -1
        self._serve_until = float("-inf")
        #: `token` answers served from memory (the metrics' count: one addition).
        self.served = 0

    def answer(self, request_id: int, min_valid: float, now: float) -> bytes | None:
        """The encoded answer if the held bearer will do; None if the caller must wait.

        The hot path of the whole daemon: one comparison and one splice of bytes.
        """
        if self._revision != self._session.revision:
            self._prepare()
        left = self._serve_until - now
        if left <= 0 or left < min_valid or self._prepared is None:
            return None
        self.served += 1
        return self._prepared.frame(request_id)

    def _prepare(self) -> None:
        """Encode the token answer once per change of the session, not per request."""
        session = self._session
        tokens = session.tokens
        self._revision = session.revision
        if tokens is None:
            self._prepared, self._serve_until = None, float("-inf")
            return
        self._serve_until = tokens.expires_at
        self._prepared = PreparedResponse({"ok": True, **token_fields(self._name, tokens)})
