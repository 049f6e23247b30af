"""Concurrency leases and parked lines behind one small interface: Redis for production, memory for tests.

Slots are leases in a sorted set, renewed while a job runs, so a worker killed with SIGKILL gives its
slots back when its leases expire. Dramatiq's own ``ConcurrentRateLimiter`` keeps one counter with one
TTL per key: a killed worker leaks its slot, and every new acquisition refreshes the TTL, so the slot
may never come back while the user keeps submitting; a job longer than the TTL lets the key expire and
admits too many.

A message that finds its key full is parked in the key's line, keyed by its entry id (the job id when
the message carries one, else its message id): the line is the ids in order, the message bodies are a
hash beside it, and one index names the key each id waits under. So a cancel takes a job out of line
in one call, without knowing the user or decoding a message, and the same job is never parked twice.
A freed slot passes to the oldest parked entry (its id holds the slot until the message comes back and
takes it over), with a safety copy in ``handoffs`` until the message is confirmed enqueued again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import redis


def now_ms() -> int:
    """Wall-clock milliseconds shared by every process (leases must compare across machines)."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Parked:
    """A message waiting in a line: its entry id (job id, else message id) and its encoded form."""

    id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class UserLoad:
    """How many of one user's jobs of one actor run now, and how many wait parked for a slot."""

    actor: str
    user_id: str
    running: int
    waiting: int


class LeaseStore(Protocol):
    """Where concurrency leases and parked messages live; every method is atomic."""

    def acquire(
        self,
        key: str,
        holder: str,
        *,
        limit: int,
        lease_ms: int,
        park: Parked | None = None,
        handoff: str | None = None,
    ) -> bool:
        """Take (or keep) a slot for ``holder``; when full, park ``park`` (if given) and return False.

        A slot handed to ``handoff`` (a parked entry's id) passes to ``holder``, once: a second
        delivery of the same message finds it gone and competes for a slot like any other. An entry
        whose id already waits in a line is not parked a second time (the one in line keeps its place).
        """
        ...

    def park_behind(self, key: str, park: Parked) -> bool:
        """Park the entry behind the key's parked entries if any wait; False, and nothing written, if none do."""
        ...

    def release(self, key: str, holder: str | None, *, limit: int, lease_ms: int) -> list[Parked]:
        """Free ``holder``'s slot and hand free slots to parked entries, oldest first; return them to enqueue."""
        ...

    def renew(self, leases: list[tuple[str, str]], *, lease_ms: int, recreate: bool = False) -> None:
        """Extend the live leases (key, holder) this process holds; an expired one is not brought back.

        With ``recreate`` (the backend restarted and lost them) every lease given is written again.
        """
        ...

    def epoch(self) -> str:
        """Changes when the backend lost or may have lost its state (a Redis restart): held leases are renewed then."""
        ...

    def parked_keys(self) -> dict[str, int]:
        """Keys with parked entries, and the limit they were parked under."""
        ...

    def parked(self, key: str) -> list[Parked]:
        """The key's parked entries, oldest first."""
        ...

    def take_out(self, entry_id: str) -> bool:
        """Take the entry out of whichever line it waits in; False if it waits in none (or was handed off)."""
        ...

    def handed_off(self, entry_id: str) -> None:
        """Forget a handed-off entry's safety copy once its message is safely enqueued."""
        ...

    def stale_handoffs(self, older_than_ms: int) -> list[Parked]:
        """Handed-off entries never confirmed enqueued (their process died), to enqueue again."""
        ...

    def loads(self) -> list[UserLoad]:
        """Running and waiting counts per actor and user."""
        ...


def _load(key: str, running: int, waiting: int) -> UserLoad:
    actor, _, user_id = key.partition(":")
    return UserLoad(actor=actor, user_id=user_id, running=running, waiting=waiting)


# KEYS: leases, line, bodies, index, parked_keys, limits
_ACQUIRE = """
local leases, line, bodies, index, parked_keys, limits = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local holder, id, body, key_id, handoff = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
redis.call('zremrangebyscore', leases, '-inf', now)
if handoff ~= '' and handoff ~= holder and redis.call('zrem', leases, handoff) == 1 then
  redis.call('zadd', leases, now + lease, holder)
  redis.call('pexpire', leases, lease * 4)
  return 1
end
if redis.call('zscore', leases, holder) or redis.call('zcard', leases) < limit then
  redis.call('zadd', leases, now + lease, holder)
  redis.call('pexpire', leases, lease * 4)
  return 1
end
if id ~= '' then
  if redis.call('hsetnx', bodies, id, body) == 1 then
    redis.call('rpush', line, id)
    redis.call('hset', index, id, key_id)
  end
  redis.call('sadd', parked_keys, key_id)
  redis.call('hset', limits, key_id, limit)
end
return 0
"""

# KEYS: line, bodies, index, parked_keys
_PARK_BEHIND = """
local line, bodies, index, parked_keys = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, body, key_id = ARGV[1], ARGV[2], ARGV[3]
if redis.call('llen', line) == 0 then return 0 end
if redis.call('hsetnx', bodies, id, body) == 1 then
  redis.call('rpush', line, id)
  redis.call('hset', index, id, key_id)
end
redis.call('sadd', parked_keys, key_id)
return 1
"""

_RENEW = """
local now, expiry, lease, recreate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
for i, leases in ipairs(KEYS) do
  local holder = ARGV[4 + i]
  local score = redis.call('zscore', leases, holder)
  if recreate or (score and tonumber(score) > now) then
    redis.call('zadd', leases, expiry, holder)
    redis.call('pexpire', leases, lease * 4)
  end
end
return 1
"""

# KEYS: leases, line, bodies, index, parked_keys, handoffs; returns id1, body1, id2, body2, ...
_RELEASE = """
local leases, line, bodies, index, parked_keys, handoffs = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local holder, key_id = ARGV[4], ARGV[5]
if holder ~= '' then redis.call('zrem', leases, holder) end
redis.call('zremrangebyscore', leases, '-inf', now)
local out = {}
while redis.call('zcard', leases) < limit do
  local id = redis.call('lpop', line)
  if not id then break end
  local body = redis.call('hget', bodies, id)
  if body then
    redis.call('hdel', bodies, id)
    if redis.call('hget', index, id) == key_id then redis.call('hdel', index, id) end
    redis.call('zadd', leases, now + lease, id)
    redis.call('hset', handoffs, id, now .. '\\n' .. body)
    table.insert(out, id)
    table.insert(out, body)
  end
end
if redis.call('zcard', leases) > 0 then redis.call('pexpire', leases, lease * 4) end
if redis.call('llen', line) == 0 then
  redis.call('srem', parked_keys, key_id)
  redis.call('del', bodies)
end
return out
"""

# KEYS: index, parked_keys; ARGV: line prefix, bodies prefix, id
_TAKE_OUT = """
local index, parked_keys = KEYS[1], KEYS[2]
local line_prefix, bodies_prefix, id = ARGV[1], ARGV[2], ARGV[3]
local key_id = redis.call('hget', index, id)
if not key_id then return 0 end
redis.call('hdel', index, id)
local line = line_prefix .. key_id
local removed = redis.call('hdel', bodies_prefix .. key_id, id)
redis.call('lrem', line, 0, id)
if redis.call('llen', line) == 0 then redis.call('srem', parked_keys, key_id) end
return removed
"""


class RedisLeaseStore:
    """Leases and parked lines in Redis, shared by every worker process and machine.

    Layout under ``namespace``: ``leases:<key>`` (sorted set holder -> expiry), ``parked:<key>`` (list
    of entry ids, oldest first), ``parked-bodies:<key>`` (hash id -> encoded message), ``parked-at``
    (hash id -> key, for one-call cancels and the reconciler), ``parked-keys`` (set of keys with a
    line), ``limits`` (hash key -> limit parked under), ``handoffs`` (hash id -> ms + newline + body).
    """

    def __init__(self, client: redis.Redis, *, namespace: str = "llm-throttle") -> None:
        self._client = client
        self._ns = namespace
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._park_behind = client.register_script(_PARK_BEHIND)
        self._renew = client.register_script(_RENEW)
        self._take_out = client.register_script(_TAKE_OUT)

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a script, once more at once if the connection broke: a pooled connection that died with an
        earlier outage (or a Redis restart) fails once before the pool replaces it. Every script here is
        safe to run twice (a holder keeps its own slot, an id already in line is not parked again)."""
        try:
            return script(keys=keys, args=args)
        except redis.ConnectionError:
            return script(keys=keys, args=args)

    @property
    def client(self) -> redis.Redis:
        """The Redis client this store uses."""
        return self._client

    def _leases(self, key: str) -> str:
        return f"{self._ns}:leases:{key}"

    def _line(self, key: str) -> str:
        return f"{self._ns}:parked:{key}"

    def _bodies(self, key: str) -> str:
        return f"{self._ns}:parked-bodies:{key}"

    @property
    def parked_index_key(self) -> str:
        """The Redis hash of every parked entry id -> the key it waits under (read by the reconciler)."""
        return f"{self._ns}:parked-at"

    @property
    def handoffs_key(self) -> str:
        """The Redis hash of handed-off entry ids not yet confirmed enqueued (read by the reconciler)."""
        return f"{self._ns}:handoffs"

    @property
    def _parked_keys(self) -> str:
        return f"{self._ns}:parked-keys"

    @property
    def _limits(self) -> str:
        return f"{self._ns}:limits"

    def acquire(
        self,
        key: str,
        holder: str,
        *,
        limit: int,
        lease_ms: int,
        park: Parked | None = None,
        handoff: str | None = None,
    ) -> bool:
        """Take or keep a slot (or the one handed to ``handoff``); when full, park the entry."""
        result = self._run(
            self._acquire,
            [
                self._leases(key),
                self._line(key),
                self._bodies(key),
                self.parked_index_key,
                self._parked_keys,
                self._limits,
            ],
            [
                now_ms(),
                lease_ms,
                limit,
                holder,
                park.id if park is not None else "",
                park.body if park is not None else b"",
                key,
                handoff or "",
            ],
        )
        return bool(result)

    def park_behind(self, key: str, park: Parked) -> bool:
        """Join the key's line of parked entries, if it has one."""
        keys = [self._line(key), self._bodies(key), self.parked_index_key, self._parked_keys]
        return bool(self._run(self._park_behind, keys, [park.id, park.body, key]))

    def release(self, key: str, holder: str | None, *, limit: int, lease_ms: int) -> list[Parked]:
        """Free a slot and hand free slots to parked entries, oldest first."""
        flat = cast(
            list[bytes],
            self._run(
                self._release,
                [
                    self._leases(key),
                    self._line(key),
                    self._bodies(key),
                    self.parked_index_key,
                    self._parked_keys,
                    self.handoffs_key,
                ],
                [now_ms(), lease_ms, limit, holder or "", key],
            )
            or [],
        )
        return [Parked(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    def renew(self, leases: list[tuple[str, str]], *, lease_ms: int, recreate: bool = False) -> None:
        """Extend live leases in one round trip (all of them, lost ones too, with ``recreate``)."""
        if not leases:
            return
        now = now_ms()
        self._run(
            self._renew,
            [self._leases(key) for key, _ in leases],
            [now, now + lease_ms, lease_ms, "1" if recreate else "0", *[holder for _, holder in leases]],
        )

    def epoch(self) -> str:
        """The Redis server's ``run_id``: new after every restart, with or without persistence."""
        return str(cast(dict[str, object], self._client.info("server")).get("run_id", ""))

    def parked_keys(self) -> dict[str, int]:
        """Keys with parked entries and their limits."""
        members = cast(set[bytes], self._client.smembers(self._parked_keys))
        keys = [member.decode() for member in members]
        if not keys:
            return {}
        limits = cast(list[bytes | None], self._client.hmget(self._limits, keys))
        return {key: int(limit or 1) for key, limit in zip(keys, limits, strict=True)}

    def parked(self, key: str) -> list[Parked]:
        """The key's parked entries, oldest first (read in one transaction)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.lrange(self._line(key), 0, -1)
        pipe.hgetall(self._bodies(key))
        ids, bodies = cast(tuple[list[bytes], dict[bytes, bytes]], tuple(pipe.execute()))
        return [Parked(raw.decode(), bodies[raw]) for raw in ids if raw in bodies]

    def take_out(self, entry_id: str) -> bool:
        """One script: find the entry's line in the index, remove it from the line and its body."""
        keys = [self.parked_index_key, self._parked_keys]
        args = [f"{self._ns}:parked:", f"{self._ns}:parked-bodies:", entry_id]
        return bool(self._run(self._take_out, keys, args))

    def handed_off(self, entry_id: str) -> None:
        """Drop the safety copy of a handed-off entry."""
        self._client.hdel(self.handoffs_key, entry_id)

    def stale_handoffs(self, older_than_ms: int) -> list[Parked]:
        """Handoffs whose process died before enqueueing them."""
        cutoff = now_ms() - older_than_ms
        stale = []
        for entry_id, value in cast(dict[bytes, bytes], self._client.hgetall(self.handoffs_key)).items():
            stamp, _, body = value.partition(b"\n")
            if int(stamp) < cutoff:
                stale.append(Parked(entry_id.decode(), body))
        return stale

    def loads(self) -> list[UserLoad]:
        """Running and waiting counts per actor and user (scans the namespace: for CLIs and metrics)."""
        now = now_ms()
        counts: dict[str, list[int]] = {}
        for raw in self._client.scan_iter(match=f"{self._ns}:leases:*", count=500):
            key = raw.decode().removeprefix(f"{self._ns}:leases:")
            counts.setdefault(key, [0, 0])[0] = int(self._client.zcount(raw, now, "+inf"))
        for raw in self._client.scan_iter(match=f"{self._ns}:parked:*", count=500):
            key = raw.decode().removeprefix(f"{self._ns}:parked:")
            counts.setdefault(key, [0, 0])[1] = int(self._client.llen(raw))
        return [
            _load(key, running, waiting) for key, (running, waiting) in sorted(counts.items()) if running or waiting
        ]


@dataclass
class _MemoryKey:
    leases: dict[str, int] = field(default_factory=dict)
    line: dict[str, bytes] = field(default_factory=dict)  # insertion order is the line's order
    limit: int = 1


class MemoryLeaseStore:
    """The same semantics in process memory, for unit tests with Dramatiq's ``StubBroker``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _MemoryKey] = {}
        self._index: dict[str, str] = {}
        self._handoffs: dict[str, tuple[int, bytes]] = {}

    def _expire(self, state: _MemoryKey, now: int) -> None:
        for holder in [h for h, expiry in state.leases.items() if expiry <= now]:
            del state.leases[holder]

    def _park(self, key: str, state: _MemoryKey, park: Parked) -> None:
        if park.id not in state.line:
            state.line[park.id] = park.body
            self._index[park.id] = key

    def acquire(
        self,
        key: str,
        holder: str,
        *,
        limit: int,
        lease_ms: int,
        park: Parked | None = None,
        handoff: str | None = None,
    ) -> bool:
        """Take or keep a slot (or the one handed to ``handoff``); when full, park the entry."""
        now = now_ms()
        with self._lock:
            state = self._keys.setdefault(key, _MemoryKey())
            self._expire(state, now)
            if handoff is not None and handoff != holder and state.leases.pop(handoff, None) is not None:
                state.leases[holder] = now + lease_ms
                return True
            if holder in state.leases or len(state.leases) < limit:
                state.leases[holder] = now + lease_ms
                return True
            if park is not None:
                self._park(key, state, park)
                state.limit = limit
            return False

    def park_behind(self, key: str, park: Parked) -> bool:
        """Join the key's line of parked entries, if it has one."""
        with self._lock:
            state = self._keys.get(key)
            if state is None or not state.line:
                return False
            self._park(key, state, park)
            return True

    def release(self, key: str, holder: str | None, *, limit: int, lease_ms: int) -> list[Parked]:
        """Free a slot and hand free slots to parked entries, oldest first."""
        now = now_ms()
        with self._lock:
            state = self._keys.setdefault(key, _MemoryKey())
            if holder is not None:
                state.leases.pop(holder, None)
            self._expire(state, now)
            out = []
            while len(state.leases) < limit and state.line:
                entry_id = next(iter(state.line))
                body = state.line.pop(entry_id)
                if self._index.get(entry_id) == key:
                    del self._index[entry_id]
                state.leases[entry_id] = now + lease_ms
                self._handoffs[entry_id] = (now, body)
                out.append(Parked(entry_id, body))
            return out

    def renew(self, leases: list[tuple[str, str]], *, lease_ms: int, recreate: bool = False) -> None:
        """Extend live leases (all of them, lost ones too, with ``recreate``)."""
        now = now_ms()
        with self._lock:
            for key, holder in leases:
                state = self._keys.setdefault(key, _MemoryKey())
                if recreate or state.leases.get(holder, 0) > now:
                    state.leases[holder] = now + lease_ms

    def epoch(self) -> str:
        """Memory never loses its state while the process lives."""
        return "memory"

    def forget_everything(self) -> None:
        """Lose every lease and parked entry, as a Redis restarted without persistence does (for tests)."""
        with self._lock:
            self._keys.clear()
            self._index.clear()
            self._handoffs.clear()

    def parked_keys(self) -> dict[str, int]:
        """Keys with parked entries and their limits."""
        with self._lock:
            return {key: state.limit for key, state in self._keys.items() if state.line}

    def parked(self, key: str) -> list[Parked]:
        """The key's parked entries, oldest first."""
        with self._lock:
            state = self._keys.get(key)
            return [Parked(i, body) for i, body in state.line.items()] if state is not None else []

    def take_out(self, entry_id: str) -> bool:
        """Remove the entry from the line it waits in."""
        with self._lock:
            key = self._index.pop(entry_id, None)
            state = self._keys.get(key) if key is not None else None
            return state is not None and state.line.pop(entry_id, None) is not None

    def handed_off(self, entry_id: str) -> None:
        """Drop the safety copy of a handed-off entry."""
        with self._lock:
            self._handoffs.pop(entry_id, None)

    def stale_handoffs(self, older_than_ms: int) -> list[Parked]:
        """Handoffs never confirmed enqueued."""
        cutoff = now_ms() - older_than_ms
        with self._lock:
            return [Parked(entry_id, body) for entry_id, (stamp, body) in self._handoffs.items() if stamp < cutoff]

    def loads(self) -> list[UserLoad]:
        """Running and waiting counts per actor and user."""
        now = now_ms()
        with self._lock:
            result = []
            for key, state in sorted(self._keys.items()):
                self._expire(state, now)
                if state.leases or state.line:
                    result.append(_load(key, len(state.leases), len(state.line)))
            return result
