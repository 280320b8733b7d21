"""What sealing costs: per rotation (seal + write + fsync), and at a restart.

- `rotation`: `Store.save` of a realistic session (a ~700-byte bearer, the emulator's
  refresh token) into a state directory on this machine's disk, with and without a
  key, interleaved in rounds; medians per save. Also the seal alone, in memory.
- `restart`: 10,000 saved sessions, once in clear and once sealed (the same sessions),
  and the daemon started on each, alternately: time from exec to READY=1, which covers
  reading and opening every file. Plus the store's own load of all of them in-process,
  which leaves out the interpreter's start-up.

The token path does not touch the store (profile.token_frame answers from memory), so
sealing cannot change it; this measures only where sealing runs.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from broker.core.sealing import Key, Keyring
from broker.core.secret import Secret
from broker.storage.keys import encode_key
from broker.storage.store import Record, Store

from .fleet import fleet

_BEARER = "eyJhbGciOiJIUzI1NiJ9." + "x" * 640 + ".sig-" + "y" * 38
_RECORD = Record(
    username="demo@example.com",
    remember=True,
    refresh=Secret("r" * 96),
    bearer=Secret(_BEARER),
    obtained_at=1.7e9,
    expires_at=1.7e9 + 900,
    session_expires_at=1.7e9 + 7 * 86400,
    last_refresh_at=1.7e9,
    refreshes=12,
)


def rotation(saves: int = 300, rounds: int = 5) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="gbs-", dir="/tmp"))
    ring = Keyring(Key.generate())
    stores = {"clear": Store(workdir / "clear"), "sealed": Store(workdir / "sealed", ring)}
    per_save: dict[str, list[float]] = {name: [] for name in stores}
    try:
        for store in stores.values():
            store.prepare()
        # Save by save, alternately, so that both meet the disk in the same mood: an
        # fsync here costs from a few hundred microseconds to tens of milliseconds.
        for i in range(saves * rounds):
            order = list(stores.items()) if i % 2 == 0 else list(stores.items())[::-1]
            for name, store in order:
                started = time.perf_counter()
                store.save(f"p{i % 50}", _RECORD)
                per_save[name].append(time.perf_counter() - started)
        data = json.dumps(_RECORD.to_json("default"), indent=1).encode() + b"\n"
        blob = ring.seal("default", data)
        started = time.perf_counter()
        for _ in range(saves * 10):
            ring.seal("default", data)
        seal_only = (time.perf_counter() - started) / (saves * 10)
        started = time.perf_counter()
        for _ in range(saves * 10):
            ring.open("default", blob)
        open_only = (time.perf_counter() - started) / (saves * 10)
    finally:
        for store in stores.values():
            store.close()
        shutil.rmtree(workdir, ignore_errors=True)
    clear, sealed = (statistics.median(per_save[n]) for n in ("clear", "sealed"))
    return {
        "saves": saves,
        "rounds": rounds,
        "clear_us": clear * 1e6,
        "sealed_us": sealed * 1e6,
        "ratio": sealed / clear,
        "seal_only_us": seal_only * 1e6,
        "open_only_us": open_only * 1e6,
    }


def restart(profiles: int = 10_000, rounds: int = 6) -> dict[str, Any]:
    key = Key.generate()
    with fleet(profiles, start=False) as running:
        clear_state = running.workdir / "state"
        sealed_state = running.workdir / "sealed-state"
        shutil.copytree(clear_state, sealed_state)
        (sealed_state / ".lock").unlink(missing_ok=True)
        key_path = running.workdir / "broker.key"
        key_path.write_bytes(encode_key(key))
        key_path.chmod(0o600)
        resealer = Store(sealed_state, Keyring(key))
        resealer.prepare()
        try:
            names = resealer.profiles()
            assert all(resealer.reseal(name) for name in names)
        finally:
            resealer.close()
        clear_config = running.config
        sealed_config = running.workdir / "sealed.toml"
        text = clear_config.read_text().replace(
            f'state_dir = "{clear_state}"',
            f'state_dir = "{sealed_state}"\nkey_file = "{key_path}"',
        )
        sealed_config.write_text(text)
        ready: dict[str, list[float]] = {"clear": [], "sealed": []}
        load: dict[str, list[float]] = {"clear": [], "sealed": []}
        variants = [("clear", clear_config, clear_state), ("sealed", sealed_config, sealed_state)]
        for round_ in range(rounds):
            # Alternate which goes first, so that neither always finds the caches warm.
            order = variants if round_ % 2 == 0 else variants[::-1]
            for name, config, _ in order:
                running.config = config
                started = time.monotonic()
                running.start()
                ready[name].append(time.monotonic() - started)
                assert running.daemon is not None
                assert running.daemon.stop() == 0
                running.daemon = None
            for name, _, state in order:
                store = Store(state, Keyring(key) if name == "sealed" else Keyring())
                store.prepare()
                started = time.perf_counter()
                try:
                    loaded = [store.load(n) for n in names]
                finally:
                    store.close()
                load[name].append(time.perf_counter() - started)
                assert all(r is not None for r in loaded)
        running.config = clear_config
    ready_clear, ready_sealed = (statistics.median(ready[n]) for n in ("clear", "sealed"))
    load_clear, load_sealed = (statistics.median(load[n]) for n in ("clear", "sealed"))
    return {
        "profiles": profiles,
        "rounds": rounds,
        "ready_clear_s": ready_clear,
        "ready_sealed_s": ready_sealed,
        "ready_ratio": ready_sealed / ready_clear,
        "load_clear_s": load_clear,
        "load_sealed_s": load_sealed,
        "load_ratio": load_sealed / load_clear,
    }


def table(rotation_result: dict[str, Any] | None, restart_result: dict[str, Any] | None) -> str:
    out = []
    if rotation_result:
        r = rotation_result
        out.append(
            f"**Sealing, per rotation** (Store.save: serialise, seal, write, fsync, rename, fsync "
            f"the directory; median of {r['rounds'] * r['saves']:,} saves each, alternated): "
            f"clear {r['clear_us']:,.0f} µs, sealed {r['sealed_us']:,.0f} µs "
            f"({r['ratio']:.2f}x); in memory, the seal alone {r['seal_only_us']:.1f} µs, the "
            f"open {r['open_only_us']:.1f} µs (a ~1.5 KB session)."
        )
    if restart_result:
        r = restart_result
        out.append(
            f"**Sealing, restart with {r['profiles']:,} sessions** (median of {r['rounds']} "
            f"starts, alternately first): READY=1 after {r['ready_clear_s']:.2f} s in clear, "
            f"{r['ready_sealed_s']:.2f} s sealed (**{r['ready_ratio']:.2f}x**, goal 1.2x); the "
            f"store's load alone {r['load_clear_s']:.2f} s / {r['load_sealed_s']:.2f} s "
            f"({r['load_ratio']:.2f}x)."
        )
    return "\n\n".join(out)
