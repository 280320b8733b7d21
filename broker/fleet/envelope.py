"""What a shared session's sealed blob holds: the session, its generation and its
commit time, all under the seal.

The store's plain fields (`gen`, `at`, `ts`, the announcement's header) are writable by
whoever reaches Redis; only what is sealed is believed. A reader compares the sealed
generation with the one the store or the announcement names, and refuses a record
whose two disagree (a sealed record saved earlier and published again under a higher
number) or that is not newer than what it holds. The commit time the rebase starts
from is the sealed one too.

A record sealed before the generation moved inside (a bare session) is refused: it
cannot be told from a replay. Each node republishes its own copy over it
(docs/cluster.md, "Upgrading").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final

from broker.core.sealing import Keyring, SealError, is_sealed
from broker.storage.store import Record

#: The envelope's format, inside the seal.
FORMAT: Final = 1


class RecordRefused(SealError):
    """A record that opens but is not to be believed (no sealed generation, or not the
    one it is published under). Never carries a secret."""

    def __init__(self, message: str, sealed_generation: int) -> None:
        super().__init__(message)
        #: What the seal says (0: none), to decide whether ours is newer.
        self.sealed_generation = sealed_generation


@dataclass(frozen=True, slots=True)
class Opened:
    generation: int
    committed_at: float
    #: None: a logout, fleet-wide.
    session: Record | None


def seal(
    keyring: Keyring, profile: str, generation: int, committed_at: float, session: Record | None
) -> bytes:
    plain = {
        "fleet": FORMAT,
        "generation": generation,
        "committed_at": committed_at,
        "session": None if session is None else session.to_json(profile),
    }
    return keyring.seal(profile, json.dumps(plain).encode())


def open_record(keyring: Keyring, profile: str, blob: bytes, published_as: int) -> Opened:
    """The sealed record published under generation `published_as`. Raises SealError
    (does not open, or in clear), RecordRefused (no sealed generation, or another one)
    or ValueError (not a session)."""
    if not is_sealed(blob):
        raise SealError("the record in the store is not sealed; refusing it")
    data = json.loads(keyring.open(profile, blob).data)
    if not isinstance(data, dict) or data.get("fleet") != FORMAT:
        raise RecordRefused("a record without a sealed generation (sealed by an older version)", 0)
    generation, committed_at = data.get("generation"), data.get("committed_at")
    if (
        not isinstance(generation, int)
        or isinstance(generation, bool)
        or not isinstance(committed_at, int | float)
        or isinstance(committed_at, bool)
    ):
        raise ValueError("a record whose sealed generation or time is not a number")
    if generation != published_as:
        raise RecordRefused(
            f"sealed as generation {generation} but published as {published_as}", generation
        )
    session = data.get("session")
    record = None if session is None else Record.from_json(session, profile)
    return Opened(generation, float(committed_at), record)
