"""Customer sessions in Redis: fleet mode's `SessionStore` (customers/contract.py).

The same records as in SQLite (sealed twice, record.py: the generation and commit time
inside both seals), kept where every node of the fleet reaches them, with the same
lease and compare-and-set as shared profiles (redis_store.py):

- a refresh holds the session's lease (`rotating`), re-reads the record under it and
  commits with a compare-and-set on the generation it read; a node that finds a newer
  generation adopts it instead of refreshing, so one refresh per rotation fleet-wide;
- ending a session deletes it and announces `"<app> <id>"`; every node drops its copy
  from memory, so a logout (or a purge, or "log out everywhere") on one node ends it on
  all. The announcement is a hint, never believed for more: a false one costs a reload
  from the store (whoever can publish can also delete);
- the store key (the session ids' MAC key) is in Redis, sealed with the fleet's keyring,
  so every node finds a handle's session under the same id; each node writes its copy
  back if the key disappears (Redis restarted empty).

Keys (the `{cs/<app>}` hash tag keeps an app's keys in one slot; no handle, username
or token in clear: ids are keyed hashes, the name and the record are sealed):
  <prefix>:{cs/<app>}:s:<id>    hash: gen, blob (the record), name (the username,
                                sealed), cust (customer id), rem, created, ends
  <prefix>:{cs/<app>}:l:<id>    the session's lease: "<node> <random>", PX lease_ttl
  <prefix>:{cs/<app>}:used      zset: id -> last use (every session)
  <prefix>:{cs/<app>}:short     zset: id -> last use (sessions not remembered)
  <prefix>:{cs/<app>}:ends      zset: id -> absolute end
  <prefix>:{cs/<app>}:c:<cust>  zset: id -> last use (one customer's sessions)
  <prefix>:customers:store-key  the store key, sealed
  <prefix>:customers:ended      pub/sub channel: "<app> <id>" per ended session

Every plain value is writable by whoever reaches Redis: a value that does not parse is
`StoreCorrupt`, turned into the store's failure (`StoreError`, or `FleetUnavailable`
for a lease) at this boundary: it fails the one request or refresh, never the daemon.
Every wait is bounded: a lease held by another node is waited on for at most two lease
times (a lease without expiry for a full lease time at each look).
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import trio
from coredis.retry import NoRetryPolicy

from broker.core.errors import FleetUnavailable, StoreError
from broker.core.sealing import Keyring, SealError
from broker.customers.contract import CommitConflict, Current, Row, StoreStats
from broker.customers.model.handles import STORE_KEY_SIZE, StoreKey
from broker.fleet.redis_store import (
    GENERATION_LUA,
    MAX_GENERATION,
    Acquired,
    HeldWithoutExpiry,
    StoreFailure,
    as_text,
    as_time,
    escaped,
    first_leaf,
    integer,
    parse_generation,
)
from broker.fleet.shared_link import reason
from broker.observe.log import events
from broker.policy import rotation

if TYPE_CHECKING:
    from broker.fleet.coordinator import Fleet

log = events("broker.fleet")

_STORE_KEY_LABEL: Final = "customer-store-key"
#: Ids and customer ids are SHA-256 MACs: 64 hex digits in keys and members.
_ID_HEX: Final = 64
#: The first wait for another node's lease, doubled up to `_LEASE_STEP_MAX`: a holder
#: releases as soon as it commits (one Geins round trip), so short looks find it free.
_LEASE_STEP: Final = 0.005
_LEASE_STEP_MAX: Final = 0.25
#: The most ids one delete script takes (Redis runs a script alone: keep it short).
_DELETE_CHUNK: Final = 200
#: The most sessions one customer's listing reads.
_MAX_CUSTOMER_SESSIONS: Final = 1000
_MAX_TOUCHES: Final = 100_000

_COMMIT: Final = (
    GENERATION_LUA
    + """
local g, bad = generation(KEYS[1], redis.call('HGET', KEYS[1], 'gen'))
if not g then return bad end
local new = tonumber(ARGV[2])
if ARGV[1] == 'if' then
  if g ~= tonumber(ARGV[3]) then return {0, g} end
elseif g == 0 or g >= new then
  return {0, g}
end
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'blob', ARGV[4], 'name', ARGV[5], 'cust', ARGV[6],
  'rem', ARGV[7], 'created', ARGV[8], 'ends', ARGV[9])
redis.call('ZADD', KEYS[2], 'GT', ARGV[10], ARGV[11])
redis.call('ZADD', KEYS[5], 'GT', ARGV[10], ARGV[11])
if ARGV[7] == '0' then redis.call('ZADD', KEYS[3], 'GT', ARGV[10], ARGV[11]) end
if ARGV[9] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[9], ARGV[11])
else
  redis.call('ZREM', KEYS[4], ARGV[11])
end
return {1, new}
"""
)
#: KEYS: used, short, ends. ARGV: the app's key base, the channel, the app, ids...
_DELETE: Final = """
local n = 0
for i = 4, #ARGV do
  local s = ARGV[1] .. ':s:' .. ARGV[i]
  local cust = redis.call('HGET', s, 'cust')
  n = n + redis.call('DEL', s)
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
  if cust and #cust == 64 and string.match(cust, '^%x+$') then
    redis.call('ZREM', ARGV[1] .. ':c:' .. cust, ARGV[i])
  end
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' ' .. ARGV[i])
end
return n
"""
#: KEYS: the session, used, short. ARGV: the time, the id, the app's key base.
_TOUCH: Final = """
local f = redis.call('HMGET', KEYS[1], 'rem', 'cust')
if not f[1] then return 0 end
redis.call('ZADD', KEYS[2], 'XX', 'GT', ARGV[1], ARGV[2])
if f[1] == '0' then redis.call('ZADD', KEYS[3], 'XX', 'GT', ARGV[1], ARGV[2]) end
if f[2] and #f[2] == 64 and string.match(f[2], '^%x+$') then
  redis.call('ZADD', ARGV[3] .. ':c:' .. f[2], 'XX', 'GT', ARGV[1], ARGV[2])
end
return 1
"""
#: KEYS: used, the index the ids came from. ARGV: the app's key base, ids... Eight
#: values per id; an id with no session is taken out of both indexes.
_ROWS: Final = """
local out = {}
for i = 2, #ARGV do
  local f = redis.call('HMGET', ARGV[1] .. ':s:' .. ARGV[i],
    'gen', 'blob', 'name', 'cust', 'rem', 'created', 'ends')
  if not f[1] and not f[2] then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
  for j = 1, 7 do table.insert(out, f[j] or false) end
  table.insert(out, redis.call('ZSCORE', KEYS[1], ARGV[i]) or false)
end
return out
"""
#: KEYS: a zset. ARGV: 'asc' | 'desc' | 'upto', a limit, the highest score ('upto').
_IDS: Final = """
local n = tonumber(ARGV[2])
if ARGV[1] == 'asc' then return redis.call('ZRANGE', KEYS[1], 0, n - 1, 'WITHSCORES') end
if ARGV[1] == 'desc' then return redis.call('ZRANGE', KEYS[1], 0, n - 1, 'REV', 'WITHSCORES') end
return redis.call('ZRANGE', KEYS[1], '-inf', ARGV[3], 'BYSCORE', 'LIMIT', 0, n, 'WITHSCORES')
"""
_COUNT: Final = "return redis.call('ZCARD', KEYS[1])"
#: KEYS: the store key's key. ARGV: a sealed key to set if there is none ('' to only read).
_STORE_KEY: Final = """
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'NX') end
return redis.call('GET', KEYS[1])
"""
_SCRIPTS: Final = {
    "cs_commit": _COMMIT,
    "cs_delete": _DELETE,
    "cs_touch": _TOUCH,
    "cs_rows": _ROWS,
    "cs_ids": _IDS,
    "cs_count": _COUNT,
    "cs_store_key": _STORE_KEY,
}


def _session_id(value: Any) -> bytes | None:
    """An id as a key or member holds it (64 hex digits), or None for anything else."""
    hexed = as_text(value)
    if len(hexed) != _ID_HEX or not all(c in "0123456789abcdef" for c in hexed):
        return None
    return bytes.fromhex(hexed)


class RedisCustomerStore:
    """Customer sessions in the fleet's Redis: the `SessionStore` contract (contract.py)
    that the SQLite store also meets, with a lease and a compare-and-set per refresh.

    Over the house's ~300 lines, on purpose: it is the contract's one implementation
    on Redis, method for method (rows, commits, leases, indexes, announcements), each a
    thin call to a Lua script whose answer is parsed as the store's word, never
    trusted; the scripts and the parsing are module-level, so what is left is the
    contract itself.
    """

    def __init__(self, fleet: Fleet, keyring: Keyring) -> None:
        self._fleet = fleet
        self._redis = fleet.store
        self._redis.add_scripts(_SCRIPTS)
        self._keyring = keyring
        self._config = fleet.config
        self._prefix = fleet.config.prefix
        self.channel = f"{self._prefix}:customers:ended"
        self._store_key: StoreKey | None = None
        self.stats = StoreStats()
        self._touches: dict[tuple[str, bytes], float] = {}
        self._touch_lock = trio.Lock()
        self._wake = trio.Event()
        self._dropped: Callable[[str, bytes], None] = lambda app, session_id: None

    def __repr__(self) -> str:
        return f"RedisCustomerStore({self._config.display_url!r})"

    @property
    def store_key(self) -> StoreKey:
        if self._store_key is None:
            raise StoreError("the fleet's customer store key is not loaded yet")
        return self._store_key

    # -- keys ------------------------------------------------------------------------------

    def _base(self, app: str) -> str:
        return f"{self._prefix}:{{cs/{app}}}"

    def _session(self, app: str, session_id: bytes) -> str:
        return f"{self._base(app)}:s:{session_id.hex()}"

    def _lease(self, app: str, session_id: bytes) -> str:
        return f"{self._base(app)}:l:{session_id.hex()}"

    def _index(self, app: str, name: str) -> str:
        return f"{self._base(app)}:{name}"

    def _customer(self, app: str, customer_id: bytes) -> str:
        return f"{self._base(app)}:c:{customer_id.hex()}"

    @property
    def _store_key_key(self) -> str:
        return f"{self._prefix}:customers:store-key"

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the store key (raises StoreError if it cannot be had within a bounded
        time), then until cancelled: write last uses, hear ended sessions, keep the
        store key in the store."""
        await self._load_store_key()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._touch_loop)
            nursery.start_soon(self._subscriber)
            nursery.start_soon(self._keep_store_key)
            task_status.started()

    def close(self) -> None:
        """Nothing to close: the connections are the fleet's."""

    def watch(self, dropped: Callable[[str, bytes], None]) -> None:
        self._dropped = dropped

    def size(self) -> int:
        return 0

    def _failure(self, exc: BaseException) -> StoreError:
        self._fleet.failed(first_leaf(exc))
        return StoreError(f"the fleet store {self._config.display_url}: {reason(exc)}")

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._redis.script(name, keys, args)
        except StoreFailure as exc:
            raise self._failure(exc) from None

    # -- the store key -----------------------------------------------------------------------

    async def _load_store_key(self) -> None:
        """The fleet's store key: the one in Redis, or (none after two polls, in case a
        node is writing its copy back) a new one, set only if still none is there."""
        deadline = trio.current_time() + max(4 * self._config.poll_interval, 10.0)
        waited_for_others = False
        while True:
            try:
                found = await self._script("cs_store_key", [self._store_key_key], [""])
                if found is None and not waited_for_others:
                    waited_for_others = True
                    await trio.sleep(2 * self._config.poll_interval)
                    continue
                if found is None:
                    sealed = self._keyring.seal(_STORE_KEY_LABEL, StoreKey.generate().material)
                    found = await self._script("cs_store_key", [self._store_key_key], [sealed])
                self._store_key = self._open_store_key(found)
                return
            except StoreError as exc:
                if trio.current_time() >= deadline:
                    raise StoreError(f"customer sessions: {exc}") from None
            await trio.sleep(0.25)

    def _open_store_key(self, found: Any) -> StoreKey:
        if not isinstance(found, bytes):
            raise StoreError("the fleet store holds no customer store key")
        try:
            opened = self._keyring.open(_STORE_KEY_LABEL, found)
        except SealError as exc:
            raise StoreError(f"the fleet's customer store key does not open ({exc})") from None
        if len(opened.data) != STORE_KEY_SIZE:
            raise StoreError("the fleet's customer store key is damaged")
        return StoreKey(opened.data)

    async def _keep_store_key(self) -> None:
        """Write the store key back if it is gone (Redis restarted empty); say so if
        another is there (a node that started while Redis was empty)."""
        told = False
        while True:
            await trio.sleep(self._config.poll_interval)
            key = self.store_key
            try:
                sealed = self._keyring.seal(_STORE_KEY_LABEL, key.material)
                found = await self._script("cs_store_key", [self._store_key_key], [sealed])
                same = self._open_store_key(found) == key
            except StoreError as exc:
                same, why = True, str(exc)
                if "does not open" in why or "damaged" in why:
                    same = False
            if not same and not told:
                log.error("customer_store_key_differs", store=self._config.display_url)
            told = not same

    # -- leases ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def rotating(self, app: str, session_id: bytes) -> AsyncIterator[Current]:
        """Hold the session's lease for the block (extended while it runs) and yield
        its row as stored now. Raises FleetUnavailable when the lease cannot be had
        (the store unreachable, or another node holding it past two lease times)."""
        key = self._lease(app, session_id)
        value = f"{self._config.node} {secrets.token_hex(8)}"
        await self._acquire(key, value)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, key, value)
                yield Current(await self.get(app, session_id))
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The keeper only logs; what the nursery raised is the row's read or the
            # caller's block (a rejected refresh token, a lost compare-and-set, a store
            # failure), which callers catch by its own type: hand it on as raised, not
            # wrapped, or an ordinary failure would end the daemon.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self._config.command_timeout):
                try:
                    await self._redis.release_key(key, value)
                except StoreFailure as exc:
                    self._fleet.failed(first_leaf(exc))

    async def _acquire(self, key: str, value: str) -> None:
        config = self._config
        deadline = trio.current_time() + 2 * config.lease_ttl
        step = _LEASE_STEP
        while True:
            try:
                got = await self._redis.acquire_key(key, value, config.lease_ttl)
            except StoreFailure as exc:
                self._fleet.failed(first_leaf(exc))
                raise FleetUnavailable(
                    f"the fleet store {config.display_url} is unreachable: {reason(exc)}"
                ) from None
            if isinstance(got, Acquired):
                return
            if isinstance(got, HeldWithoutExpiry):
                # No node sets one: wait a full lease per look, never a hot loop.
                log.error("lease_without_expiry", holder=escaped(got.by))
                wait = rotation.lease_wait(None, config.lease_ttl)
            else:
                wait = min(rotation.lease_wait(got.ttl, config.lease_ttl), step)
                step = min(step * 2, _LEASE_STEP_MAX)
            left = deadline - trio.current_time()
            if left <= 0:
                raise FleetUnavailable(
                    f"another node has held a customer session's lease for over "
                    f"{2 * config.lease_ttl:g} s"
                )
            await trio.sleep(min(wait, left))

    async def _keep(self, key: str, value: str) -> None:
        lease_ttl = self._config.lease_ttl
        while True:
            await trio.sleep(rotation.extend_every(lease_ttl))
            try:
                if not await self._redis.extend_key(key, value, lease_ttl):
                    log.warning("customer_lease_lost")
                    return  # the compare-and-set fences what follows
            except StoreFailure as exc:
                self._fleet.failed(first_leaf(exc))

    # -- writes ------------------------------------------------------------------------------

    async def commit(self, row: Row, *, expected: int | None = None) -> None:
        """Write `row` if the store holds generation `expected` (None: only over an
        existing record with a lower one, a write-back). Raises CommitConflict if not."""
        new = row.generation
        if new is None or not 0 < new <= MAX_GENERATION:
            raise StoreError(f"generation {new} cannot be written")
        app, sid = row.app, row.session_id
        started = time.monotonic()
        written, generation = await self._script(
            "cs_commit",
            [
                self._session(app, sid),
                self._index(app, "used"),
                self._index(app, "short"),
                self._index(app, "ends"),
                self._customer(app, row.customer_id),
            ],
            [
                "higher" if expected is None else "if",
                str(new),
                str(expected or 0),
                row.record,
                row.name,
                row.customer_id.hex(),
                "1" if row.remember else "0",
                repr(row.created_at),
                "" if row.ends_at is None else repr(row.ends_at),
                repr(row.last_used_at),
                sid.hex(),
            ],
        )
        self.stats.commit_seconds += time.monotonic() - started
        if not integer(written, "commit's answer"):
            self.stats.failures += 1
            raise CommitConflict(
                f"the fleet store holds generation {as_text(generation)[:20]!r}, not {expected}"
            )
        self.stats.commits += 1
        self.stats.rows += 1
        self._fleet.succeeded()

    async def delete_many(self, app: str, session_ids: list[bytes]) -> int:
        """Delete them, announcing each end to every node; how many there were."""
        gone = 0
        keys = [self._index(app, "used"), self._index(app, "short"), self._index(app, "ends")]
        for start in range(0, len(session_ids), _DELETE_CHUNK):
            chunk = [sid.hex() for sid in session_ids[start : start + _DELETE_CHUNK]]
            answer = await self._script(
                "cs_delete", keys, [self._base(app), self.channel, app, *chunk]
            )
            gone += integer(answer, "delete's answer")
        return gone

    def touch(self, app: str, session_id: bytes, at: float) -> None:
        if len(self._touches) < _MAX_TOUCHES:
            key = (app, session_id)
            self._touches[key] = max(at, self._touches.get(key, 0.0))
            self._wake.set()

    async def flush(self) -> None:
        async with self._touch_lock:
            await self._write_touches()

    async def _touch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            async with self._touch_lock:
                try:
                    await self._write_touches()
                except StoreError as exc:
                    log.warning("customer_touch_failed", reason=str(exc))

    async def _write_touches(self) -> None:
        touches, self._touches = self._touches, {}
        for (app, sid), at in touches.items():
            await self._script(
                "cs_touch",
                [self._session(app, sid), self._index(app, "used"), self._index(app, "short")],
                [repr(at), sid.hex(), self._base(app)],
            )

    # -- hearing ends ------------------------------------------------------------------------

    async def _subscriber(self) -> None:
        delay = 0.1
        while True:
            try:
                client = self._redis.subscriber()
                async with (
                    client,
                    client.pubsub(
                        channels=[self.channel],
                        ignore_subscribe_messages=True,
                        retry_policy=NoRetryPolicy(),
                    ) as pubsub,
                ):
                    delay = 0.1
                    async for message in pubsub:
                        self._heard(message.get("data"))
            except Exception as exc:  # coredis raises groups too: resubscribe on any
                self._fleet.failed(first_leaf(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _heard(self, data: object) -> None:
        """`"<app> <id>"`: drop that session from memory. Anything else is ignored."""
        if not isinstance(data, bytes) or len(data) > 200:
            return
        app, _, hexed = data.decode(errors="replace").partition(" ")
        session_id = _session_id(hexed)
        if app and session_id is not None:
            self._dropped(app, session_id)

    # -- reads -------------------------------------------------------------------------------

    async def get(self, app: str, session_id: bytes) -> Row | None:
        rows = await self._rows(app, self._index(app, "used"), [session_id])
        return rows[0] if rows else None

    async def _rows(self, app: str, index: str, ids: list[bytes]) -> list[Row]:
        """The rows of `ids` that exist. Raises StoreError if one does not parse."""
        if not ids:
            return []
        flat = await self._script(
            "cs_rows",
            [self._index(app, "used"), index],
            [self._base(app), *(sid.hex() for sid in ids)],
        )
        rows = []
        for i, sid in enumerate(ids):
            fields = flat[8 * i : 8 * i + 8]
            if fields[0] is None and fields[1] is None:
                continue
            try:
                rows.append(self._row(app, sid, fields))
            except StoreFailure as exc:  # StoreCorrupt: the store's failure
                raise self._failure(exc) from None
        return rows

    def _row(self, app: str, sid: bytes, fields: list[Any]) -> Row:
        gen, blob, name, cust, rem, created, ends, used = fields
        where = escaped(self._session(app, sid))
        customer_id = _session_id(cust)
        if blob is None or name is None or customer_id is None or rem not in (b"0", b"1"):
            raise StoreError(f"{where}: a session with a field missing or malformed")
        return Row(
            session_id=sid,
            app=app,
            customer_id=customer_id,
            name=bytes(name),
            remember=rem == b"1",
            created_at=as_time(created, "created"),
            last_used_at=as_time(used, "last use") if used is not None else 0.0,
            ends_at=None if not ends else as_time(ends, "absolute end"),
            record=bytes(blob),
            generation=parse_generation(gen, where),
        )

    async def _ids(
        self, index: str, order: str, limit: int, upto: float = 0.0
    ) -> list[tuple[bytes, float]]:
        flat = await self._script("cs_ids", [index], [order, str(limit), repr(upto)])
        found = []
        for i in range(0, len(flat) - 1, 2):
            sid = _session_id(flat[i])
            try:
                score = as_time(flat[i + 1], "a last use")
            except StoreFailure:
                continue
            if sid is not None:
                found.append((sid, score))
        return found

    async def count(self, app: str) -> int:
        return integer(await self._script("cs_count", [self._index(app, "used")], []), "ZCARD")

    async def customer_sessions(self, app: str, customer_id: bytes) -> list[Row]:
        """A customer's sessions, least recently used first."""
        index = self._customer(app, customer_id)
        ids = await self._ids(index, "asc", _MAX_CUSTOMER_SESSIONS)
        rows = await self._rows(app, index, [sid for sid, _ in ids])
        return sorted(rows, key=lambda r: r.last_used_at)

    async def customer_uses(self, app: str, customer_id: bytes) -> list[tuple[bytes, float]]:
        return await self._ids(self._customer(app, customer_id), "asc", _MAX_CUSTOMER_SESSIONS)

    async def least_recent(self, app: str, limit: int) -> list[tuple[bytes, float]]:
        return await self._ids(self._index(app, "used"), "asc", limit)

    async def listing(self, app: str, limit: int) -> list[Row]:
        index = self._index(app, "used")
        ids = await self._ids(index, "desc", limit)
        return await self._rows(app, index, [sid for sid, _ in ids])

    async def ended(
        self, app: str, now: float, idle_short: float, idle_remembered: float, limit: int
    ) -> list[Row]:
        """Sessions past their absolute end or idle by the stored last use."""
        found: dict[bytes, str] = {}
        for name, upto in (
            ("ends", now),
            ("used", now - idle_remembered),
            ("short", now - idle_short),
        ):
            index = self._index(app, name)
            for sid, _ in await self._ids(index, "upto", limit, upto):
                found.setdefault(sid, index)
        rows: list[Row] = []
        for index in dict.fromkeys(found.values()):
            ids = [sid for sid, where in found.items() if where == index]
            rows += await self._rows(app, index, ids)
        return rows[:limit]
