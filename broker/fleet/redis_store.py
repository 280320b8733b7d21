"""The fleet's Redis shell: leases, records, generations, heartbeats, on coredis.

Every check-and-write is one Lua script, so it is atomic on the server: taking a
lease is SET NX PX; extending and releasing it happen only while its value is still
ours; a commit compares the generation and writes and publishes in one step. Redis's
own clock stamps commits and heartbeats, so the nodes' clocks never need to agree.

Keys (the `{profile}` hash tag keeps a profile's keys in one slot):
  <prefix>:{<profile>}:record  hash: gen, node, at (committer's wall time), ts/tus
                               (Redis TIME at commit), blob (the sealed session,
                               its generation and commit time: envelope.py)
  <prefix>:{<profile>}:lease   string: "<node> <random>", with a PX expiry
  <prefix>:nodes               hash: node -> Redis time (s) of its last heartbeat
  <prefix>:generations         pub/sub channel, one message per commit:
                               "<profile> <gen> <ts> <tus> <node> <at>\n<blob>", so a
                               node adopts a commit without reading the record back

Nothing here knows a token: records arrive sealed, and errors name the store only.
Every plain field is writable by whoever reaches Redis: a value that does not parse
raises `StoreCorrupt` (a `StoreFailure`), and results are named (`Acquired`, `Held`,
`HeldWithoutExpiry`; `Written`), never sign-coded.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import coredis
from coredis.retry import NoRetryPolicy

from broker.fleet.settings import ClusterConfig

#: The highest generation written: 15 decimal digits, far below 2**53, so the write
#: script's Lua (double) numbers hold it exactly. A rotation a second would take
#: thirty million years to get there; a store claiming more is corrupt.
MAX_GENERATION: Final = 10**15 - 1
_GENERATION_DIGITS: Final = len(str(MAX_GENERATION))
#: The longest node name believed from the store (the `[cluster]` node setting's bound).
_MAX_NODE: Final = 200
#: The most bytes read of a lease's value ("<node> <16 hex digits>").
_MAX_LEASE: Final = 256
#: The longest plain field of a record (generation, node, times) a node writes.
_MAX_FIELD: Final = 256
#: The largest sealed record believed (as a session file's, storage/store.py).
MAX_RECORD: Final = 1 << 20
#: The most nodes a heartbeat lists.
_MAX_LISTED_NODES: Final = 256

#: Reads a generation field: nil, or an error reply naming the key, for anything but a
#: decimal integer of at most 15 digits. Lua numbers are doubles: every integer up to
#: 2**53 is exact and `tostring` writes it as digits, while a larger one would come
#: back as `1e+20`; a generation of 15 digits never gets there.
GENERATION_LUA: Final = """
local function generation(key, value)
  if not value then return 0 end
  if not string.match(value, '^%d+$') or #value > 15 then
    return nil, redis.error_reply('corrupt generation in ' .. key)
  end
  return tonumber(value)
end
"""
_WRITE: Final = (
    GENERATION_LUA
    + """
local g, bad = generation(KEYS[1], redis.call('HGET', KEYS[1], 'gen'))
if not g then return bad end
local new = tonumber(ARGV[2])
if ARGV[1] == 'if' then
  if g ~= tonumber(ARGV[3]) then return {0, g} end
elseif g >= new then
  return {0, g}
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'node', ARGV[4], 'at', ARGV[5],
  'ts', t[1], 'tus', t[2], 'blob', ARGV[6])
redis.call('PUBLISH', ARGV[7], ARGV[8] .. ' ' .. ARGV[2] .. ' ' .. t[1] .. ' ' .. t[2]
  .. ' ' .. ARGV[4] .. ' ' .. ARGV[5] .. '\\n' .. ARGV[6])
return {1, new}
"""
)
#: Refuses (an error reply) a record with a field longer than any node writes, before
#: any of it is sent: a store's value is read into every node's memory at every read.
_READ: Final = f"""
for _, f in ipairs({{'gen', 'node', 'at', 'ts', 'tus'}}) do
  if redis.call('HSTRLEN', KEYS[1], f) > {_MAX_FIELD} then
    return redis.error_reply('oversized ' .. f .. ' in ' .. KEYS[1])
  end
end
if redis.call('HSTRLEN', KEYS[1], 'blob') > {MAX_RECORD} then
  return redis.error_reply('oversized record in ' .. KEYS[1])
end
local r = redis.call('HMGET', KEYS[1], 'gen', 'node', 'at', 'ts', 'tus', 'blob')
local t = redis.call('TIME')
table.insert(r, t[1]); table.insert(r, t[2])
return r
"""
#: {1} when the lease is now ours; otherwise {0, its PTTL (-1: no expiry), its value}.
_ACQUIRE: Final = f"""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {{1}} end
return {{0, redis.call('PTTL', KEYS[1]), redis.call('GETRANGE', KEYS[1], 0, {_MAX_LEASE - 1})}}
"""
_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: A generation too long to be one comes back as a word that does not parse, a lease's
#: value cut to what a node writes (its holder is only shown).
_POLL: Final = f"""
local out = {{}}
for i = 1, #KEYS, 2 do
  if redis.call('HSTRLEN', KEYS[i], 'gen') > {_MAX_FIELD} then
    table.insert(out, 'oversized')
  else
    table.insert(out, redis.call('HGET', KEYS[i], 'gen') or '0')
  end
  table.insert(out, redis.call('GETRANGE', KEYS[i + 1], 0, {_MAX_LEASE - 1}))
  table.insert(out, redis.call('PTTL', KEYS[i + 1]))
end
return out
"""
#: Nothing ever removes a node's entry, and anyone may add some: only the entries a
#: node could have written within ARGV[2] seconds (a name of a node's length, a Redis
#: time not in the future) come back, at most `_MAX_LISTED_NODES` of them.
_HEARTBEAT: Final = f"""
local t = redis.call('TIME')
local now = tonumber(t[1])
redis.call('HSET', KEYS[1], ARGV[1], t[1])
local window = tonumber(ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
local out = {{}}
for i = 1, #all, 2 do
  if #out >= {2 * _MAX_LISTED_NODES} then break end
  local at = #all[i + 1] <= {_MAX_FIELD} and tonumber(all[i + 1])
  if at and #all[i] <= {_MAX_NODE} and at <= now and now - at <= window then
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
  end
end
table.insert(out, t[1])
return out
"""
_SCRIPTS: Final = {
    "write": _WRITE,
    "read": _READ,
    "acquire": _ACQUIRE,
    "extend": _EXTEND,
    "release": _RELEASE,
    "poll": _POLL,
    "heartbeat": _HEARTBEAT,
}
#: Keys per poll script call, so one call never blocks Redis for long.
_POLL_CHUNK: Final = 500


class PoolDown(Exception):
    """The connection pool died and is being renewed (see `Fleet._keep_pool`), or a
    command failed with a group of errors from coredis's tasks."""


class StoreCorrupt(Exception):
    """A value read from the store that does not parse (a generation that is not a
    number, a missing field, a time that is not one). Anyone who can write to Redis can
    put one there: it is the store's failure, handled as one being unreachable, never
    an error that ends the daemon. The message shows the value escaped and bounded."""


def first_leaf(exc: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: what to log as the reason."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


#: What a lost or refused connection raises, from coredis or the socket under it, and
#: what a value that does not parse raises.
StoreFailure: Final = (
    coredis.exceptions.RedisError,
    OSError,
    TimeoutError,
    PoolDown,
    StoreCorrupt,
)


def escaped(value: object, limit: int = 80) -> str:
    """`value` as text safe for a log line or a terminal: control characters escaped
    (the store is writable by whoever reaches Redis), at most `limit` characters."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return repr(text[:limit])[1:-1]


@dataclass(frozen=True, slots=True)
class Stored:
    generation: int
    node: str
    #: The committer's wall time at commit, as the store's plain field says it (the
    #: sealed record carries its own, which is the one believed).
    committed_at: float
    store_committed_ms: int
    store_now_ms: int
    blob: bytes


class LeaseState(StrEnum):
    FREE = "free"
    HELD = "held"
    #: Held by a value with no expiry (PTTL -1): no node ever set one so, as every
    #: lease is taken with PX. Treated as held for a full lease time at each look.
    HELD_WITHOUT_EXPIRY = "held_without_expiry"


@dataclass(frozen=True, slots=True)
class Acquired:
    """The lease is ours."""


@dataclass(frozen=True, slots=True)
class Held:
    """Another holder has the lease for `ttl` more seconds (0: it was just released)."""

    by: str
    ttl: float


@dataclass(frozen=True, slots=True)
class HeldWithoutExpiry:
    """The lease key exists with no expiry: wait as for a full lease, then look again."""

    by: str


Acquisition = Acquired | Held | HeldWithoutExpiry


@dataclass(frozen=True, slots=True)
class Written:
    """A write's outcome: whether it wrote, and the generation the store holds now."""

    written: bool
    generation: int


@dataclass(frozen=True, slots=True)
class Polled:
    generation: int
    lease_node: str | None
    lease: LeaseState = LeaseState.FREE


def as_text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def parse_generation(value: Any, where: str) -> int:
    """A generation field: decimal digits, at most `MAX_GENERATION`. Raises StoreCorrupt.
    The length is checked first: `int` refuses a string of over 4,300 digits with a
    ValueError, which is no store failure and would end the daemon."""
    text = as_text(value)
    if not (text.isascii() and text.isdigit() and len(text) <= _GENERATION_DIGITS):
        raise StoreCorrupt(f"{where}: generation {escaped(text)!r} is not a generation")
    return int(text)


def integer(value: Any, what: str) -> int:
    text = as_text(value)
    if not (text.isascii() and text.lstrip("-").isdigit()) or len(text) > 20:
        raise StoreCorrupt(f"{what} {escaped(text)!r} is not an integer")
    return int(text)


def as_time(value: Any, what: str) -> float:
    try:
        seconds = float(as_text(value))
    except ValueError:
        seconds = float("nan")
    if not 0.0 <= seconds < 1e11:  # NaN fails too
        raise StoreCorrupt(f"{what} {escaped(as_text(value))!r} is not a time")
    return seconds


def lease_holder(value: Any) -> str | None:
    """The node named by a lease's value ("<node> <random>"), bounded; None if free."""
    node = as_text(value).split(" ")[0]
    return node[:_MAX_NODE] or None


class RedisStore:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.channel = f"{config.prefix}:generations"
        self._sources = dict(_SCRIPTS)
        self.renew()

    def renew(self) -> coredis.Redis[bytes]:
        """A new client (and pool) with the scripts registered on it: the coordinator
        enters it for as long as it lives, and renews it if the pool ever dies."""
        self._client: coredis.Redis[bytes] = self._connect(self.config)
        self._scripts = {
            name: self._client.register_script(source) for name, source in self._sources.items()
        }
        return self._client

    def add_scripts(self, sources: dict[str, str]) -> None:
        """More scripts (the customer store's), registered now and on every renewal."""
        self._sources.update(sources)
        for name, source in sources.items():
            self._scripts[name] = self._client.register_script(source)

    async def script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a registered script; the pool's death raises PoolDown."""
        return await self._run(name, keys, args)

    def __repr__(self) -> str:
        return f"RedisStore({self.config.display_url!r})"

    @staticmethod
    def _connect(config: ClusterConfig) -> coredis.Redis[bytes]:
        options: dict[str, Any] = {
            "stream_timeout": config.command_timeout,
            "connect_timeout": config.command_timeout,
            "retry_policy": NoRetryPolicy(),
            "client_name": f"geins-broker:{config.node}",
        }
        if config.password is not None:
            options["password"] = config.password.reveal()
        if config.url.startswith("rediss://"):
            # Verified TLS: the system's CAs, or the configured one only.
            cafile = None if config.ca_file is None else str(config.ca_file)
            options["ssl_context"] = ssl.create_default_context(cafile=cafile)
        return coredis.Redis.from_url(config.url, **options)

    def subscriber(self) -> coredis.Redis[bytes]:
        """A client of its own for one subscription: a subscription that dies with its
        connection then takes nothing else down with it."""
        return self._connect(self.config)

    def record_key(self, profile: str) -> str:
        return f"{self.prefix}:{{{profile}}}:record"

    def lease_key(self, profile: str) -> str:
        return f"{self.prefix}:{{{profile}}}:lease"

    @property
    def nodes_key(self) -> str:
        return f"{self.prefix}:nodes"

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self._scripts[name](keys=list(keys), args=list(args))
        except RuntimeError as exc:
            # coredis says so when its pool has exited: between a pool's death and
            # its renewal, the store is as good as unreachable.
            if "pool" not in str(exc):
                raise
            raise PoolDown("the connection pool is being renewed") from None
        except ExceptionGroup as group:
            raise PoolDown(str(first_leaf(group))[:200]) from None

    async def acquire(self, profile: str, value: str, ttl: float) -> Acquisition:
        """Take the lease if it is free; otherwise who holds it and for how long."""
        return await self.acquire_key(self.lease_key(profile), value, ttl)

    async def acquire_key(self, key: str, value: str, ttl: float) -> Acquisition:
        """`acquire` for the lease at `key` (a customer session's, too)."""
        reply = await self._run("acquire", [key], [value, _ms(ttl)])
        if integer(reply[0], "acquire's answer") == 1:
            return Acquired()
        pttl, by = integer(reply[1], "the lease's PTTL"), as_text(reply[2])
        holder = lease_holder(by) or "?"
        if pttl == -1:
            return HeldWithoutExpiry(holder)
        return Held(holder, max(pttl, 0) / 1000.0)

    async def extend(self, profile: str, value: str, ttl: float) -> bool:
        return await self.extend_key(self.lease_key(profile), value, ttl)

    async def extend_key(self, key: str, value: str, ttl: float) -> bool:
        return bool(await self._run("extend", [key], [value, _ms(ttl)]))

    async def release(self, profile: str, value: str) -> bool:
        return await self.release_key(self.lease_key(profile), value)

    async def release_key(self, key: str, value: str) -> bool:
        return bool(await self._run("release", [key], [value]))

    async def read(self, profile: str) -> Stored:
        """The record (generation 0 and no blob when there is none) and the store time.
        Raises StoreCorrupt for a record whose plain fields do not parse."""
        key = self.record_key(profile)
        gen, node, at, ts, tus, blob, now_s, now_us = await self._run("read", [key], [])
        store_now = integer(now_s, "TIME") * 1000 + integer(now_us, "TIME") // 1000
        if gen is None and blob is None:
            return Stored(0, "", 0.0, store_now, store_now, b"")
        if gen is None or blob is None or node is None or ts is None or tus is None:
            raise StoreCorrupt(f"{escaped(key)}: a record with a field missing")
        return Stored(
            generation=parse_generation(gen, escaped(key)),
            node=as_text(node)[:_MAX_NODE],
            committed_at=0.0 if at is None else as_time(at, "commit time"),
            store_committed_ms=integer(ts, "ts") * 1000 + integer(tus, "tus") // 1000,
            store_now_ms=store_now,
            blob=bytes(blob),
        )

    async def write_if(
        self, profile: str, *, expected: int, new: int, committed_at: float, blob: bytes
    ) -> Written:
        """Compare-and-set: write generation `new` only if the store holds `expected`."""
        return await self._write(
            profile, "if", new=new, expected=expected, committed_at=committed_at, blob=blob
        )

    async def write_if_higher(
        self, profile: str, *, new: int, committed_at: float, blob: bytes
    ) -> Written:
        """Write generation `new` only if the store holds less (the highest wins)."""
        return await self._write(
            profile, "higher", new=new, expected=0, committed_at=committed_at, blob=blob
        )

    async def _write(
        self, profile: str, mode: str, *, new: int, expected: int, committed_at: float, blob: bytes
    ) -> Written:
        if not 0 < new <= MAX_GENERATION:
            raise StoreCorrupt(f"generation {new} is past the highest one written")
        written, generation = await self._run(
            "write",
            [self.record_key(profile)],
            [
                mode,
                str(new),
                str(expected),
                self.config.node,
                repr(committed_at),
                blob,
                self.channel,
                profile,
            ],
        )
        return Written(bool(written), integer(generation, "the written generation"))

    async def poll(self, profiles: Sequence[str]) -> dict[str, Polled]:
        """Every profile's generation and lease, a few round trips for all. Raises
        StoreCorrupt if any generation does not parse."""
        result: dict[str, Polled] = {}
        for start in range(0, len(profiles), _POLL_CHUNK):
            chunk = profiles[start : start + _POLL_CHUNK]
            keys = [k for p in chunk for k in (self.record_key(p), self.lease_key(p))]
            flat = await self._run("poll", keys, [])
            for i, profile in enumerate(chunk):
                gen, value, pttl = flat[3 * i : 3 * i + 3]
                holder = lease_holder(value)
                state = LeaseState.FREE
                if holder is not None:
                    state = LeaseState.HELD
                    if integer(pttl, "the lease's PTTL") == -1:
                        state = LeaseState.HELD_WITHOUT_EXPIRY
                generation = parse_generation(gen, escaped(self.record_key(profile)))
                result[profile] = Polled(generation, holder, state)
        return result

    async def heartbeat(self, window: float) -> tuple[dict[str, float], float]:
        """Mark this node alive; the last heartbeat of every node seen within `window`
        seconds (at most a few hundred) and the store's time (s). An entry that does
        not parse (a name too long, a time that is not one) is left out: it is no
        node's."""
        flat = await self._run("heartbeat", [self.nodes_key], [self.config.node, math.ceil(window)])
        now = as_time(flat[-1], "TIME")
        pairs = flat[:-1]
        nodes: dict[str, float] = {}
        for i in range(0, len(pairs) - 1, 2):
            name = as_text(pairs[i])
            try:
                at = as_time(pairs[i + 1], "heartbeat")
            except StoreCorrupt:
                continue
            if 0 < len(name) <= _MAX_NODE:
                nodes[name] = at
        return nodes, now


def announcement(data: bytes) -> tuple[str, Stored] | None:
    """A commit as published: the profile and its record (`store_now_ms` is the commit's
    own time, as the message arrives at once). None if it is not one."""
    header, newline, blob = data.partition(b"\n")
    fields = header.decode(errors="replace").split(" ")
    if not newline or not blob or len(blob) > MAX_RECORD or len(fields) != 6:
        return None
    profile, generation, ts, tus, node, at = fields
    try:
        committed_ms = integer(ts, "ts") * 1000 + integer(tus, "tus") // 1000
        stored = Stored(
            parse_generation(generation, "announcement"),
            node[:_MAX_NODE],
            as_time(at, "commit time"),
            committed_ms,
            committed_ms,
            blob,
        )
    except StoreCorrupt:
        return None
    return profile, stored


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)
