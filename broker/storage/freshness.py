"""The state directory's high-water marks: the highest generation each profile's
session file has had, and whether `rekey` has run, sealed in one small file.

A sealed session file proves who wrote it, not when: a copy saved earlier and put
back opens as well as the newest. Each sealed file therefore carries a generation
inside its seal, and this file, sealed with the same keys and replaced atomically
after each session write, keeps the highest one seen, so a file that goes backwards
is refused, across restarts. What it cannot see: the whole directory (sessions and
this file) restored together from one earlier copy, which is consistent in itself;
only state kept outside the directory could tell (docs/security.md, "Freshness").

Pure: bytes in, marks out; store.py reads and writes the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from broker.core.sealing import Keyring, SealError

#: The file's name in the state directory (a dot file: never taken for a session).
NAME: Final = ".high-water"
#: What the seal binds this file to, in place of a profile's name (which has no NUL).
_AAD_NAME: Final = "\0high-water"
FORMAT: Final = 1


@dataclass(frozen=True, slots=True)
class Marks:
    generations: Mapping[str, int] = field(default_factory=dict)
    #: `rekey` has sealed every file: from now on a file in clear is not ours.
    rekeyed: bool = False

    def get(self, profile: str) -> int | None:
        return self.generations.get(profile)

    def raised(self, profile: str, generation: int) -> Marks:
        if (self.generations.get(profile) or 0) >= generation:
            return self
        return Marks({**self.generations, profile: generation}, self.rekeyed)


def encode(keyring: Keyring, marks: Marks) -> bytes:
    plain = {"format": FORMAT, "generations": dict(marks.generations), "rekeyed": marks.rekeyed}
    return keyring.seal(_AAD_NAME, json.dumps(plain, sort_keys=True).encode())


def decode(keyring: Keyring, blob: bytes) -> Marks:
    """The marks in `blob`. Raises SealError (does not open, or in clear) or
    ValueError (not marks)."""
    opened = keyring.open(_AAD_NAME, blob)
    if opened.key is None:
        raise SealError("the high-water file is in clear")
    data = json.loads(opened.data)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a high-water file")
    generations = data.get("generations")
    rekeyed = data.get("rekeyed")
    if not isinstance(generations, dict) or not isinstance(rekeyed, bool):
        raise ValueError("not a high-water file")
    for profile, generation in generations.items():
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise ValueError(f"the generation of {profile!r} is not a number")
    return Marks(dict(generations), rekeyed)


def sealed_generation(data: object) -> int | None:
    """The generation inside an opened session file's JSON; None before they had one."""
    if not isinstance(data, dict):
        return None
    value = data.get("generation")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None
