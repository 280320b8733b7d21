"""The fleet's Redis shell: leases, records, generations, heartbeats, on coredis.

Every check-and-write is one Lua script, so it is atomic on the server: taking a
lease is SET NX PX; extending and releasing it happen only while its value is still
ours; a commit compares the generation and writes and publishes in one step. Redis's
own clock stamps commits and heartbeats, so the nodes' clocks never need to agree.

Keys (the `{profile}` hash tag keeps a profile's keys in one slot):
  <prefix>:{<profile>}:record  hash: gen, node, at (committer's wall time), ts/tus
                               (Redis TIME at commit), blob (the sealed session)
  <prefix>:{<profile>}:lease   string: "<node> <random>", with a PX expiry
  <prefix>:nodes               hash: node -> Redis time (s) of its last heartbeat
  <prefix>:generations         pub/sub channel, one message per commit:
                               "<profile> <gen> <ts> <tus> <node> <at>\n<blob>", so a
                               node adopts a commit without reading the record back

Nothing here knows a token: records arrive sealed, and errors name the store only.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import coredis
from coredis.retry import NoRetryPolicy

from broker.fleet.settings import ClusterConfig

_WRITE: Final = """
local g = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
local mode = ARGV[1]
local new = tonumber(ARGV[2])
if mode == 'cas' then
  if g ~= tonumber(ARGV[3]) then return {0, g} end
elseif mode == 'higher' then
  if g >= new then return {0, g} end
else
  new = math.max(g, new - 1) + 1
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], 'gen', tostring(new), 'node', ARGV[4], 'at', ARGV[5],
  'ts', t[1], 'tus', t[2], 'blob', ARGV[6])
redis.call('PUBLISH', ARGV[7], ARGV[8] .. ' ' .. tostring(new) .. ' ' .. t[1] .. ' ' .. t[2]
  .. ' ' .. ARGV[4] .. ' ' .. ARGV[5] .. '\\n' .. ARGV[6])
return {1, new}
"""
_READ: Final = """
local r = redis.call('HMGET', KEYS[1], 'gen', 'node', 'at', 'ts', 'tus', 'blob')
local t = redis.call('TIME')
table.insert(r, t[1]); table.insert(r, t[2])
return r
"""
_ACQUIRE: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return -math.max(redis.call('PTTL', KEYS[1]), 1)
"""
_EXTEND: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_POLL: Final = """
local out = {}
for i = 1, #KEYS, 2 do
  table.insert(out, redis.call('HGET', KEYS[i], 'gen') or '0')
  table.insert(out, redis.call('GET', KEYS[i + 1]) or '')
end
return out
"""
_HEARTBEAT: Final = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], t[1])
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, t[1])
return all
"""
#: Keys per poll script call, so one call never blocks Redis for long.
_POLL_CHUNK: Final = 500


class PoolDown(Exception):
    """The connection pool died and is being renewed (see `Fleet._keep_pool`), or a
    command failed with a group of errors from coredis's tasks."""


def first_leaf(exc: BaseException) -> BaseException:
    """The first error inside (nested) exception groups: what to log as the reason."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


#: What a lost or refused connection raises, from coredis or the socket under it.
StoreFailure: Final = (coredis.exceptions.RedisError, OSError, TimeoutError, PoolDown)


@dataclass(frozen=True, slots=True)
class Stored:
    generation: int
    node: str
    committed_at: float
    store_committed_ms: int
    store_now_ms: int
    blob: bytes


@dataclass(frozen=True, slots=True)
class Polled:
    generation: int
    lease_node: str | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisStore:
    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.channel = f"{config.prefix}:generations"
        self.renew()

    def renew(self) -> coredis.Redis[bytes]:
        """A new client (and pool) with the scripts registered on it: the coordinator
        enters it for as long as it lives, and renews it if the pool ever dies."""
        self._client: coredis.Redis[bytes] = self._connect(self.config)
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (
                ("write", _WRITE),
                ("read", _READ),
                ("acquire", _ACQUIRE),
                ("extend", _EXTEND),
                ("release", _RELEASE),
                ("poll", _POLL),
                ("heartbeat", _HEARTBEAT),
            )
        }
        return self._client

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

    async def acquire(self, profile: str, value: str, ttl: float) -> int:
        """1 if the lease is now ours; otherwise minus the holder's remaining ms."""
        return int(await self._run("acquire", [self.lease_key(profile)], [value, _ms(ttl)]))

    async def extend(self, profile: str, value: str, ttl: float) -> bool:
        return bool(await self._run("extend", [self.lease_key(profile)], [value, _ms(ttl)]))

    async def release(self, profile: str, value: str) -> bool:
        return bool(await self._run("release", [self.lease_key(profile)], [value]))

    async def read(self, profile: str) -> Stored:
        """The record (generation 0 and no blob when there is none) and the store time."""
        gen, node, at, ts, tus, blob, now_s, now_us = await self._run(
            "read", [self.record_key(profile)], []
        )
        store_now = int(now_s) * 1000 + int(now_us) // 1000
        if gen is None or blob is None:
            return Stored(0, "", 0.0, store_now, store_now, b"")
        return Stored(
            generation=int(gen),
            node=_text(node),
            committed_at=float(at),
            store_committed_ms=int(ts) * 1000 + int(tus) // 1000,
            store_now_ms=store_now,
            blob=bytes(blob),
        )

    async def write(
        self,
        profile: str,
        mode: str,
        *,
        new: int,
        expected: int,
        committed_at: float,
        blob: bytes,
    ) -> tuple[bool, int]:
        """`cas`: write `new` if the store holds `expected`; `higher`: write `new` if the
        store holds less; `force`: write max(store, new - 1) + 1. Publishes what it
        wrote. Returns (written, the generation the store holds now)."""
        written, generation = await self._run(
            "write",
            [self.record_key(profile)],
            [
                mode,
                new,
                expected,
                self.config.node,
                repr(committed_at),
                blob,
                self.channel,
                profile,
            ],
        )
        return bool(written), int(generation)

    async def poll(self, profiles: Sequence[str]) -> dict[str, Polled]:
        """Every profile's generation and lease holder, a few round trips for all."""
        result: dict[str, Polled] = {}
        for start in range(0, len(profiles), _POLL_CHUNK):
            chunk = profiles[start : start + _POLL_CHUNK]
            keys = [k for p in chunk for k in (self.record_key(p), self.lease_key(p))]
            flat = await self._run("poll", keys, [])
            for i, profile in enumerate(chunk):
                lease = _text(flat[2 * i + 1])
                result[profile] = Polled(int(flat[2 * i]), lease.split(" ")[0] or None)
        return result

    async def heartbeat(self) -> tuple[dict[str, float], float]:
        """Mark this node alive; every node's last heartbeat and the store's time (s)."""
        flat = await self._run("heartbeat", [self.nodes_key], [self.config.node])
        now = float(flat[-1])
        pairs = flat[:-1]
        return {_text(pairs[i]): float(pairs[i + 1]) for i in range(0, len(pairs), 2)}, now


def announcement(data: bytes) -> tuple[str, Stored] | None:
    """A commit as published: the profile and its record (`store_now_ms` is the commit's
    own time, as the message arrives at once). None if it is not one."""
    header, newline, blob = data.partition(b"\n")
    fields = header.decode(errors="replace").split(" ")
    if not newline or not blob or len(fields) != 6:
        return None
    profile, generation, ts, tus, node, at = fields
    try:
        committed_ms = int(ts) * 1000 + int(tus) // 1000
        return profile, Stored(int(generation), node, float(at), committed_ms, committed_ms, blob)
    except ValueError:
        return None


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)
