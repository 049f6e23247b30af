"""Per-user limiters behind one small interface, with a Redis backend for production and a memory one for tests.

``ConcurrencyLimit`` (the default) is ours: slots are leases in a sorted set, renewed while a job runs,
so a worker killed with SIGKILL gives its slots back when its leases expire. Dramatiq's own
``ConcurrentRateLimiter`` keeps one counter with one TTL per key: a killed worker leaks its slot, and
every new acquisition refreshes the TTL, so the slot may never come back while the user keeps
submitting; a job longer than the TTL lets the key expire and admits too many. A waiting message is
parked with the limiter and handed the slot of the job that releases it, so it is redelivered once.

``WindowLimit`` and ``BucketLimit`` reuse Dramatiq's ``WindowRateLimiter`` and ``BucketRateLimiter``
unchanged; only the delay before a refused message is tried again is added.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, cast

import redis
from dramatiq.rate_limits import BucketRateLimiter, WindowRateLimiter
from dramatiq.rate_limits.backend import RateLimiterBackend


@dataclass(frozen=True, slots=True)
class ConcurrencyLimit:
    """At most ``limit`` of a user's jobs of one actor run at once, across every worker."""

    limit: int

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError("limit must be at least 1")


@dataclass(frozen=True, slots=True)
class WindowLimit:
    """At most ``limit`` of a user's jobs of one actor start in any sliding window of ``window_s`` seconds."""

    limit: int
    window_s: int

    def __post_init__(self) -> None:
        if self.limit < 1 or self.window_s < 1:
            raise ValueError("limit and window_s must be at least 1")


@dataclass(frozen=True, slots=True)
class BucketLimit:
    """At most ``limit`` of a user's jobs of one actor start per fixed bucket of ``bucket_ms`` milliseconds."""

    limit: int
    bucket_ms: int

    def __post_init__(self) -> None:
        if self.limit < 1 or self.bucket_ms < 1:
            raise ValueError("limit and bucket_ms must be at least 1")


UserLimit = ConcurrencyLimit | WindowLimit | BucketLimit


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
        parked_entry: bytes | None,
        handoff: str | None = None,
    ) -> bool:
        """Take (or keep) a slot for ``holder``; when full, park ``parked_entry`` (if given) and return False.

        A slot handed to ``handoff`` (a parked message's id) passes to ``holder``, once: a second
        delivery of the same message finds it gone and competes for a slot like any other.
        """
        ...

    def park_behind(self, key: str, parked_entry: bytes) -> bool:
        """Park the entry behind the key's parked messages if any wait; False, and nothing written, if none do."""
        ...

    def release(self, key: str, holder: str | None, *, limit: int, lease_ms: int) -> list[bytes]:
        """Free ``holder``'s slot and hand free slots to parked messages; return their bodies to enqueue."""
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
        """Keys with parked messages, and the limit they were parked under."""
        ...

    def parked(self, key: str) -> list[bytes]:
        """The key's parked entries, oldest first."""
        ...

    def unpark(self, key: str, parked_entry: bytes) -> bool:
        """Take one parked entry out of line; False if it is no longer parked (handed off meanwhile)."""
        ...

    def handed_off(self, body_id: str) -> None:
        """Forget a handed-off message once it is safely enqueued."""
        ...

    def stale_handoffs(self, older_than_ms: int) -> list[tuple[str, bytes]]:
        """Handed-off messages never confirmed enqueued (their process died): (holder, body) to enqueue again."""
        ...

    def loads(self) -> list[UserLoad]:
        """Running and waiting counts per actor and user."""
        ...


def now_ms() -> int:
    """Wall-clock milliseconds shared by every process (leases must compare across machines)."""
    return int(time.time() * 1000)


def split_entry(entry: bytes) -> tuple[str, bytes]:
    """A parked entry is ``message_id`` + newline + encoded message."""
    holder, _, body = entry.partition(b"\n")
    return holder.decode(), body


_ACQUIRE = """
local leases, parked, parked_keys, limits = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local holder, entry, key_id, handoff = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
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
if entry ~= '' then
  redis.call('rpush', parked, entry)
  redis.call('sadd', parked_keys, key_id)
  redis.call('hset', limits, key_id, limit)
end
return 0
"""

_PARK_BEHIND = """
local parked, parked_keys, key_id, entry = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if redis.call('llen', parked) == 0 then return 0 end
redis.call('rpush', parked, entry)
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

_RELEASE = """
local leases, parked, parked_keys, handoffs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local holder, key_id = ARGV[4], ARGV[5]
if holder ~= '' then redis.call('zrem', leases, holder) end
redis.call('zremrangebyscore', leases, '-inf', now)
local out = {}
while redis.call('zcard', leases) < limit do
  local entry = redis.call('lpop', parked)
  if not entry then break end
  local sep = string.find(entry, '\\n', 1, true)
  local id = string.sub(entry, 1, sep - 1)
  redis.call('zadd', leases, now + lease, id)
  redis.call('hset', handoffs, id, now .. '\\n' .. string.sub(entry, sep + 1))
  table.insert(out, entry)
end
if redis.call('zcard', leases) > 0 then redis.call('pexpire', leases, lease * 4) end
if redis.call('llen', parked) == 0 then redis.call('srem', parked_keys, key_id) end
return out
"""


class RedisLeaseStore:
    """Leases and parked messages in Redis, shared by every worker process and machine."""

    def __init__(self, client: redis.Redis, *, namespace: str = "llm-throttle") -> None:
        self._client = client
        self._ns = namespace
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._park_behind = client.register_script(_PARK_BEHIND)
        self._renew = client.register_script(_RENEW)

    def _keys(self, key: str) -> tuple[str, str]:
        return f"{self._ns}:leases:{key}", f"{self._ns}:parked:{key}"

    @property
    def _parked_keys(self) -> str:
        return f"{self._ns}:parked-keys"

    @property
    def parked_keys_key(self) -> str:
        """The Redis set naming every key with parked messages (read by the reconciler)."""
        return self._parked_keys

    @property
    def parked_prefix(self) -> str:
        """The prefix of the Redis lists of parked entries; the key follows it (read by the reconciler)."""
        return f"{self._ns}:parked:"

    @property
    def handoffs_key(self) -> str:
        """The Redis hash of handed-off messages not yet confirmed enqueued (read by the reconciler)."""
        return self._handoffs

    @property
    def _limits(self) -> str:
        return f"{self._ns}:limits"

    @property
    def _handoffs(self) -> str:
        return f"{self._ns}:handoffs"

    def acquire(
        self,
        key: str,
        holder: str,
        *,
        limit: int,
        lease_ms: int,
        parked_entry: bytes | None,
        handoff: str | None = None,
    ) -> bool:
        """Take or keep a slot (or the one handed to ``handoff``); when full, park the entry."""
        leases, parked = self._keys(key)
        result = self._acquire(
            keys=[leases, parked, self._parked_keys, self._limits],
            args=[now_ms(), lease_ms, limit, holder, parked_entry or b"", key, handoff or ""],
        )
        return bool(result)

    def park_behind(self, key: str, parked_entry: bytes) -> bool:
        """Join the key's queue of parked messages, if it has one."""
        _, parked = self._keys(key)
        return bool(self._park_behind(keys=[parked, self._parked_keys], args=[key, parked_entry]))

    def release(self, key: str, holder: str | None, *, limit: int, lease_ms: int) -> list[bytes]:
        """Free a slot and hand free slots to parked messages, oldest first."""
        leases, parked = self._keys(key)
        entries = self._release(
            keys=[leases, parked, self._parked_keys, self._handoffs],
            args=[now_ms(), lease_ms, limit, holder or "", key],
        )
        return list(entries or [])

    def renew(self, leases: list[tuple[str, str]], *, lease_ms: int, recreate: bool = False) -> None:
        """Extend live leases in one round trip (all of them, lost ones too, with ``recreate``)."""
        if not leases:
            return
        now = now_ms()
        self._renew(
            keys=[self._keys(key)[0] for key, _ in leases],
            args=[now, now + lease_ms, lease_ms, "1" if recreate else "0", *[holder for _, holder in leases]],
        )

    def epoch(self) -> str:
        """The Redis server's ``run_id``: new after every restart, with or without persistence."""
        return str(cast(dict[str, object], self._client.info("server")).get("run_id", ""))

    def parked_keys(self) -> dict[str, int]:
        """Keys with parked messages and their limits."""
        members = cast(set[bytes], self._client.smembers(self._parked_keys))
        keys = [member.decode() for member in members]
        if not keys:
            return {}
        limits = cast(list[bytes | None], self._client.hmget(self._limits, keys))
        return {key: int(limit or 1) for key, limit in zip(keys, limits, strict=True)}

    def parked(self, key: str) -> list[bytes]:
        """The key's parked entries, oldest first."""
        return list(cast(list[bytes], self._client.lrange(self._keys(key)[1], 0, -1)))

    def unpark(self, key: str, parked_entry: bytes) -> bool:
        """Remove the entry from the parked list (atomic: a concurrent handoff takes it or this does)."""
        return bool(self._client.lrem(self._keys(key)[1], 1, parked_entry))  # type: ignore[arg-type]  # bytes work

    def handed_off(self, body_id: str) -> None:
        """Drop the safety copy of a handed-off message."""
        self._client.hdel(self._handoffs, body_id)

    def stale_handoffs(self, older_than_ms: int) -> list[tuple[str, bytes]]:
        """Handoffs whose process died before enqueueing them."""
        cutoff = now_ms() - older_than_ms
        stale = []
        for holder, value in cast(dict[bytes, bytes], self._client.hgetall(self._handoffs)).items():
            stamp, _, body = value.partition(b"\n")
            if int(stamp) < cutoff:
                stale.append((holder.decode(), body))
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
            UserLoad(actor=key.partition(":")[0], user_id=key.partition(":")[2], running=running, waiting=waiting)
            for key, (running, waiting) in sorted(counts.items())
            if running or waiting
        ]


@dataclass
class _MemoryKey:
    leases: dict[str, int] = field(default_factory=dict)
    parked: deque[bytes] = field(default_factory=deque)
    limit: int = 1


class MemoryLeaseStore:
    """The same semantics in process memory, for unit tests with Dramatiq's ``StubBroker``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, _MemoryKey] = {}
        self._handoffs: dict[str, tuple[int, bytes]] = {}

    def _expire(self, state: _MemoryKey, now: int) -> None:
        for holder in [h for h, expiry in state.leases.items() if expiry <= now]:
            del state.leases[holder]

    def acquire(
        self,
        key: str,
        holder: str,
        *,
        limit: int,
        lease_ms: int,
        parked_entry: bytes | None,
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
            if parked_entry is not None:
                state.parked.append(parked_entry)
                state.limit = limit
            return False

    def park_behind(self, key: str, parked_entry: bytes) -> bool:
        """Join the key's queue of parked messages, if it has one."""
        with self._lock:
            state = self._keys.get(key)
            if state is None or not state.parked:
                return False
            state.parked.append(parked_entry)
            return True

    def release(self, key: str, holder: str | None, *, limit: int, lease_ms: int) -> list[bytes]:
        """Free a slot and hand free slots to parked messages, oldest first."""
        now = now_ms()
        with self._lock:
            state = self._keys.setdefault(key, _MemoryKey())
            if holder is not None:
                state.leases.pop(holder, None)
            self._expire(state, now)
            out = []
            while len(state.leases) < limit and state.parked:
                entry = state.parked.popleft()
                parked_holder, body = split_entry(entry)
                state.leases[parked_holder] = now + lease_ms
                self._handoffs[parked_holder] = (now, body)
                out.append(entry)
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
        """Lose every lease and parked message, as a Redis restarted without persistence does (for tests)."""
        with self._lock:
            self._keys.clear()
            self._handoffs.clear()

    def parked_keys(self) -> dict[str, int]:
        """Keys with parked messages and their limits."""
        with self._lock:
            return {key: state.limit for key, state in self._keys.items() if state.parked}

    def parked(self, key: str) -> list[bytes]:
        """The key's parked entries, oldest first."""
        with self._lock:
            state = self._keys.get(key)
            return list(state.parked) if state is not None else []

    def unpark(self, key: str, parked_entry: bytes) -> bool:
        """Remove the entry from the parked list."""
        with self._lock:
            state = self._keys.get(key)
            if state is None or parked_entry not in state.parked:
                return False
            state.parked.remove(parked_entry)
            return True

    def handed_off(self, body_id: str) -> None:
        """Drop the safety copy of a handed-off message."""
        with self._lock:
            self._handoffs.pop(body_id, None)

    def stale_handoffs(self, older_than_ms: int) -> list[tuple[str, bytes]]:
        """Handoffs never confirmed enqueued."""
        cutoff = now_ms() - older_than_ms
        with self._lock:
            return [(holder, body) for holder, (stamp, body) in self._handoffs.items() if stamp < cutoff]

    def loads(self) -> list[UserLoad]:
        """Running and waiting counts per actor and user."""
        now = now_ms()
        with self._lock:
            result = []
            for key, state in sorted(self._keys.items()):
                self._expire(state, now)
                if state.leases or state.parked:
                    actor, _, user_id = key.partition(":")
                    result.append(UserLoad(actor, user_id, len(state.leases), len(state.parked)))
            return result


class StartRateGate:
    """Window and bucket limits through Dramatiq's own rate limiters; a refused message retries after a delay."""

    def __init__(self, backend: RateLimiterBackend, *, namespace: str = "llm-throttle") -> None:
        self.backend = backend
        self._ns = namespace

    def try_start(self, key: str, limit: WindowLimit | BucketLimit) -> int | None:
        """None when the job may start now, else the milliseconds to wait before trying again."""
        limiter: WindowRateLimiter | BucketRateLimiter
        if isinstance(limit, WindowLimit):
            limiter = WindowRateLimiter(  # type: ignore[no-untyped-call]
                self.backend, f"{self._ns}:window:{key}", limit=limit.limit, window=limit.window_s
            )
            # The window slides by whole seconds: a start frees up on average every window / limit.
            delay_ms = max(1000, limit.window_s * 1000 // limit.limit)
        else:
            limiter = BucketRateLimiter(  # type: ignore[no-untyped-call]
                self.backend, f"{self._ns}:bucket:{key}", limit=limit.limit, bucket=limit.bucket_ms
            )
            delay_ms = limit.bucket_ms - now_ms() % limit.bucket_ms + 1
        with limiter.acquire(raise_on_failure=False) as acquired:
            return None if acquired else delay_ms
