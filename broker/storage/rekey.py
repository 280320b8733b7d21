"""`geins-broker rekey`: seal every saved session with the current key, now, offline.

Why offline, under the state directory's lock, rather than an op the daemon answers:
- the lock (statedir.py) already says who may write the directory: while the daemon
  runs, rekey stops with its pid; while rekey runs, a daemon does not start. Nothing
  can interleave with a rotation, and there is no new op to authorise on the socket;
- it needs no daemon, so it also re-seals the files of profiles no longer configured,
  and it works before the first start after a key change;
- a running daemon needs no rekey at all: it re-seals each session at its next write
  (rotation), so online the migration finishes within one token lifetime.

Crash safety is that of every write (store.py): each file is replaced atomically, so a
kill -9 at any moment leaves each session either as it was (clear or under the previous
key, which the config still names) or sealed with the current key; the temporary file
of an interrupted write is swept at the next start. Run it again to finish.

Once done it marks the state directory as rekeyed (freshness.py's sealed file): under
the default `clear_sessions = "after_rekey"`, a session file in clear found there
later is refused, since every one this daemon wrote is sealed.
"""

from __future__ import annotations

import sys

from broker.core.errors import StateDirError, StoreError
from broker.daemon.config import ConfigError, find_config, load
from broker.storage.keys import load_keyring
from broker.storage.store import SealedState, Store

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


def main(config_path: str | None = None) -> int:
    try:
        config = load(find_config(config_path))
        keyring, source = load_keyring(config)
    except ConfigError as exc:
        return _say(str(exc), EXIT_USAGE)
    if keyring.current is None:
        return _say(
            "no key configured (key_file, or the systemd credential): nothing to seal with",
            EXIT_USAGE,
        )
    store = Store(config.state_dir, keyring, config.clear_sessions)
    try:
        store.prepare()
    except StateDirError as exc:
        hint = ""
        if "in use" in str(exc):
            hint = "; stop the daemon first (it re-seals each session at its next rotation)"
        return _say(f"{exc}{hint}", EXIT_USAGE)
    resealed = current = 0
    failed: list[str] = []
    try:
        for profile in store.profiles():
            try:
                if store.reseal(profile):
                    resealed += 1
                else:
                    current += 1
            except (SealedState, StoreError) as exc:
                failed.append(str(exc))
        try:
            # From now on a session file in clear is not ours (`clear_sessions`).
            store.mark_rekeyed()
        except StoreError as exc:
            failed.append(str(exc))
    finally:
        store.close()
    for reason in failed:
        print(f"geins-broker: {reason}; left as it is", file=sys.stderr)
    print(
        f"re-sealed {resealed} session(s) with key {keyring.current.name} ({source}); "
        f"{current} already were; {len(failed)} did not open"
    )
    return EXIT_INCOMPLETE if failed else EXIT_OK


def _say(message: str, code: int) -> int:
    print(f"geins-broker: {message}", file=sys.stderr)
    return code
