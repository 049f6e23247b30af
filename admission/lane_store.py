"""Lane state in Redis, changed only by Lua scripts so that every worker process sees one atomic lane.

Per lane (prefix ``llm-lanes:``, lane id after the last colon):

- ``slots`` (sorted set): holder -> lease expiry in ms; the requests in flight. A holder that stops
  renewing (its worker was SIGKILLed) drops out when its lease expires, and its token reservation is
  settled down to its prompt estimate (the answer it reserved may never have been generated).
- ``ev`` / ``evtok`` / ``sum``: every request admitted in the sliding window (ticket -> when it was sent:
  admission time, re-stamped right before the request leaves and again when its answer's first byte
  arrives, so the window never slides ahead of the provider's), its tokens (``reserved,prompt``) and
  their running total; a request is settled to its real usage.
- ``state`` (hash): ``until`` (paused until, ms), ``probing`` (1 after a pause: one probe goes first),
  ``probe`` (its holder), ``level`` (consecutive pauses without ``Retry-After``), ``reason``, counters.
- ``rr`` (list): the users with waiting messages, in round-robin order; ``parked:<lane>|<user>`` the
  user's waiting messages (``message_id`` newline encoded message, the throttle's format) and ``meta``
  their reservations and since when they wait.

Handed-off messages get the throttle's treatment: a safety copy in ``llm-lanes:handoffs`` until the
process that popped them has enqueued them, re-enqueued by any worker's sweep if it died first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import redis

from admission.lanes import Lane
from admission.leases import now_ms

#: Release codes instead of a token count: keep the reservation as it is, or undo it (nothing was sent).
KEEP_RESERVATION = -3
NOT_SENT = -2

_COMMON = """
local P, L, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local lease, conc, rpm, tpm, window = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7]), tonumber(ARGV[8])
local function k(name) return P .. name .. ':' .. L end
local slots, res, ev, evtok, sumk, st, rr, meta = k('slots'), k('res'), k('ev'), k('evtok'), k('sum'),
  k('state'), k('rr'), k('meta')
local handoffs, parked_keys, known = P .. 'handoffs', P .. 'parked-keys', P .. 'known'
local ttl = (window + lease) * 4

local function touch()
  for _, key in ipairs({slots, res, ev, evtok, sumk}) do redis.call('pexpire', key, ttl) end
end

local function settle_ticket(t, tokens)
  local v = redis.call('hget', evtok, t)
  if not v then return end
  local reserved, prompt = string.match(v, '^(%d+),(%d+)$')
  reserved, prompt = tonumber(reserved), tonumber(prompt)
  if tokens == -2 then
    redis.call('decrby', sumk, reserved)
    redis.call('hdel', evtok, t)
    redis.call('zrem', ev, t)
    return
  end
  if tokens < 0 then tokens = math.min(prompt, reserved) end
  redis.call('incrby', sumk, tokens - reserved)
  redis.call('hset', evtok, t, tokens .. ',' .. prompt)
end

local function expire()
  for _, h in ipairs(redis.call('zrangebyscore', slots, '-inf', now)) do
    local t = redis.call('hget', res, h)
    if t then settle_ticket(t, -1) end
    redis.call('hdel', res, h)
    redis.call('zrem', slots, h)
    if redis.call('hget', st, 'probe') == h then redis.call('hset', st, 'probe', '') end
  end
  for _, t in ipairs(redis.call('zrangebyscore', ev, '-inf', now - window)) do
    local v = redis.call('hget', evtok, t)
    if v then redis.call('decrby', sumk, tonumber(string.match(v, '^(%d+)'))) end
    redis.call('hdel', evtok, t)
    redis.call('zrem', ev, t)
  end
end

local function blocked(est)
  if conc > 0 and redis.call('zcard', slots) >= conc then return 'concurrency' end
  if rpm > 0 and redis.call('zcard', ev) >= rpm then return 'requests' end
  if tpm > 0 then
    local s = tonumber(redis.call('get', sumk) or '0')
    if s > 0 and s + est > tpm then return 'tokens' end
  end
  return nil
end

local function reserve(holder, est, prompt)
  local t = tostring(redis.call('incr', P .. 'seq'))
  redis.call('zadd', slots, now + lease, holder)
  redis.call('zadd', ev, now, t)
  redis.call('hset', evtok, t, est .. ',' .. prompt)
  redis.call('incrby', sumk, est)
  redis.call('hset', res, holder, t)
  touch()
end

local function park(entry, user, est, prompt, since)
  local sep = string.find(entry, '\\n', 1, true)
  local id = string.sub(entry, 1, sep - 1)
  local q = P .. 'parked:' .. L .. '|' .. user
  if redis.call('llen', q) == 0 then redis.call('rpush', rr, user) end
  redis.call('rpush', q, entry)
  redis.call('sadd', parked_keys, L .. '|' .. user)
  redis.call('hset', meta, id, est .. ',' .. prompt .. ',' .. since)
end

-- The next waiting entry in round-robin order, without taking it: entry, user, est, prompt.
local function peek()
  local user = redis.call('lindex', rr, 0)
  while user do
    local q = P .. 'parked:' .. L .. '|' .. user
    local entry = redis.call('lindex', q, 0)
    if entry then
      local sep = string.find(entry, '\\n', 1, true)
      local id = string.sub(entry, 1, sep - 1)
      local m = redis.call('hget', meta, id) or '0,0,0'
      local est, prompt = string.match(m, '^(%d+),(%d+)')
      return entry, user, tonumber(est), tonumber(prompt), id
    end
    redis.call('lpop', rr)
    redis.call('srem', parked_keys, L .. '|' .. user)
    user = redis.call('lindex', rr, 0)
  end
  return nil
end

local function take(user, id)
  local q = P .. 'parked:' .. L .. '|' .. user
  redis.call('lpop', rr)
  redis.call('lpop', q)
  if redis.call('llen', q) > 0 then
    redis.call('rpush', rr, user)
  else
    redis.call('srem', parked_keys, L .. '|' .. user)
  end
  redis.call('hdel', meta, id)
end

local function hand_off(out)
  local paused_until = tonumber(redis.call('hget', st, 'until') or '0')
  if now < paused_until then return end
  local probing = redis.call('hget', st, 'probing') == '1'
  if probing and (redis.call('hget', st, 'probe') or '') ~= '' then return end
  while true do
    local entry, user, est, prompt, id = peek()
    if not entry then return end
    if blocked(est) then return end
    take(user, id)
    reserve(id, est, prompt)
    redis.call('hset', handoffs, id, now .. '\\n' .. string.sub(entry, string.find(entry, '\\n', 1, true) + 1))
    table.insert(out, entry)
    if probing then
      redis.call('hset', st, 'probe', id)
      return
    end
  end
end
"""

_ADMIT = (
    _COMMON
    + """
local holder, handoff, user = ARGV[9], ARGV[10], ARGV[11]
local est, prompt, entry, since, label = tonumber(ARGV[12]), tonumber(ARGV[13]), ARGV[14], ARGV[15], ARGV[16]
redis.call('hset', known, L, label)
expire()
if handoff ~= '' and redis.call('zscore', slots, handoff) then
  redis.call('zrem', slots, handoff)
  redis.call('zadd', slots, now + lease, holder)
  local t = redis.call('hget', res, handoff)
  if t then redis.call('hset', res, holder, t) end
  redis.call('hdel', res, handoff)
  if redis.call('hget', st, 'probe') == handoff then redis.call('hset', st, 'probe', holder) end
  touch()
  return {1, 'handoff'}
end
local reason = nil
local paused_until = tonumber(redis.call('hget', st, 'until') or '0')
local probing = redis.call('hget', st, 'probing') == '1'
if now < paused_until then
  reason = 'paused'
elseif probing and (redis.call('hget', st, 'probe') or '') ~= '' then
  reason = 'probing'
elseif redis.call('llen', rr) > 0 then
  reason = 'line'
else
  reason = blocked(est)
end
if reason == nil then
  reserve(holder, est, prompt)
  if probing then redis.call('hset', st, 'probe', holder) end
  return {1, probing and 'probe' or 'free'}
end
local result = {0, reason}
if entry ~= '' then park(entry, user, est, prompt, since) end
if reason == 'line' or reason == 'probing' then hand_off(result) end
return result
"""
)

_RELEASE = (
    _COMMON
    + """
local holder, tokens = ARGV[9], tonumber(ARGV[10])
if holder ~= '' then
  local t = redis.call('hget', res, holder)
  if t and tokens ~= -3 then settle_ticket(t, tokens) end
  redis.call('hdel', res, holder)
  redis.call('zrem', slots, holder)
  if redis.call('hget', st, 'probe') == holder then
    redis.call('hset', st, 'probe', '')
    -- a probe that was never sent proves nothing: the next waiting message probes instead
    if tokens ~= -2 and now >= tonumber(redis.call('hget', st, 'until') or '0') then
      redis.call('hset', st, 'probing', '0', 'level', '0')
    end
  end
end
expire()
local out = {tonumber(redis.call('hget', st, 'until') or '0'), 0}
hand_off(out)
-- messages still wait on a window: when its oldest request leaves it, capacity may free
if redis.call('llen', rr) > 0 then
  local oldest = redis.call('zrange', ev, 0, 0, 'WITHSCORES')
  if oldest[2] then out[2] = tonumber(oldest[2]) + window + 1 end
end
return out
"""
)

_PAUSE = (
    _COMMON
    + """
local holder, retry_after, base, longest, reason = ARGV[9], tonumber(ARGV[10]), tonumber(ARGV[11]),
  tonumber(ARGV[12]), ARGV[13]
local old = tonumber(redis.call('hget', st, 'until') or '0')
local level = tonumber(redis.call('hget', st, 'level') or '0')
local already = now < old
local delay = retry_after
if retry_after < 0 then
  if not already then level = level + 1 end
  delay = math.min(base * math.pow(2, math.max(level - 1, 0)), longest)
end
local paused_until = math.max(old, now + delay)
redis.call('hset', st, 'until', paused_until, 'probing', '1', 'level', level, 'reason', reason)
redis.call('hincrby', st, 'rate_limited', 1)
if not already then redis.call('hincrby', st, 'episodes', 1) end
if redis.call('hget', st, 'probe') == holder then redis.call('hset', st, 'probe', '') end
return paused_until
"""
)

_SENDING = (
    _COMMON
    + """
local holder, answering = ARGV[9], ARGV[10] == '1'
local paused_until = tonumber(redis.call('hget', st, 'until') or '0')
local probe = redis.call('hget', st, 'probe') or ''
if not answering and now < paused_until and probe ~= holder then return paused_until end
local t = redis.call('hget', res, holder)
if t and redis.call('zscore', ev, t) then redis.call('zadd', ev, now, t) end
return 0
"""
)

_STATS = (
    _COMMON
    + """
expire()
local waiting = 0
for _, user in ipairs(redis.call('lrange', rr, 0, -1)) do
  waiting = waiting + redis.call('llen', P .. 'parked:' .. L .. '|' .. user)
end
local state = redis.call('hmget', st, 'until', 'probing', 'rate_limited', 'episodes', 'reason')
return {redis.call('zcard', ev), tonumber(redis.call('get', sumk) or '0'), redis.call('zcard', slots), waiting,
  tonumber(state[1] or '0'), state[2] or '0', tonumber(state[3] or '0'), tonumber(state[4] or '0'), state[5] or ''}
"""
)

_EXPIRED_WAITING = (
    _COMMON
    + """
local cutoff = tonumber(ARGV[9])
local out = {}
for _, user in ipairs(redis.call('lrange', rr, 0, -1)) do
  local q = P .. 'parked:' .. L .. '|' .. user
  while true do
    local entry = redis.call('lindex', q, 0)
    if not entry then break end
    local id = string.sub(entry, 1, string.find(entry, '\\n', 1, true) - 1)
    local m = redis.call('hget', meta, id) or '0,0,0'
    local since = tonumber(string.match(m, ',(%d+)$'))
    if since >= cutoff then break end
    redis.call('lpop', q)
    redis.call('hdel', meta, id)
    table.insert(out, entry)
  end
  if redis.call('llen', q) == 0 then
    redis.call('lrem', rr, 0, user)
    redis.call('srem', parked_keys, L .. '|' .. user)
  end
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer of ``admit``: admitted or not, why, and any parked messages handed a slot meanwhile."""

    admitted: bool
    reason: str
    """``free``, ``probe`` or ``handoff`` when admitted; ``paused``, ``probing``, ``line``, ``concurrency``,
    ``requests`` or ``tokens`` when the message waits."""
    handoffs: list[bytes]


@dataclass(frozen=True, slots=True)
class Released:
    """The answer of ``release``: when the pause ends and when a window may free capacity (ms, 0: not
    waiting on it), and the parked messages handed a slot."""

    paused_until_ms: int
    next_free_ms: int
    handoffs: list[bytes]


@dataclass(frozen=True, slots=True)
class LaneStats:
    """One lane as operators see it: requests and tokens in the current window, slots, pause, waiting jobs."""

    lane_id: str
    label: str
    requests: int
    tokens: int
    slots: int
    waiting: int
    paused_until_ms: int
    probing: bool
    rate_limited: int
    """429s and 529s seen by this lane (since its state was last idle long enough to expire)."""
    pause_episodes: int


class RedisLaneStore:
    """Lane slots, windows, pauses and waiting lines in Redis, shared by every worker process and machine."""

    PREFIX = "llm-lanes:"

    def __init__(self, client: redis.Redis, *, prefix: str = PREFIX) -> None:
        self._client = client
        self._prefix = prefix
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)
        self._pause = client.register_script(_PAUSE)
        self._stats = client.register_script(_STATS)
        self._sending = client.register_script(_SENDING)
        self._expired = client.register_script(_EXPIRED_WAITING)

    @property
    def parked_keys_key(self) -> str:
        """The Redis set naming every ``<lane>|<user>`` line with waiting messages (for the reconciler)."""
        return f"{self._prefix}parked-keys"

    @property
    def parked_prefix(self) -> str:
        """The prefix of the waiting lines; a member of ``parked_keys_key`` follows it (for the reconciler)."""
        return f"{self._prefix}parked:"

    @property
    def handoffs_key(self) -> str:
        """The Redis hash of handed-off messages not yet confirmed enqueued (``stamp`` newline body)."""
        return f"{self._prefix}handoffs"

    def _args(self, lane: Lane, lease_ms: int) -> list[int | str]:
        config = lane.config
        return [
            self._prefix,
            lane.lane_id,
            now_ms(),
            lease_ms,
            config.concurrent or 0,
            config.requests_per_minute or 0,
            config.tokens_per_minute or 0,
            lane.window_ms,
        ]

    def admit(
        self,
        lane: Lane,
        *,
        holder: str,
        user_id: str,
        reserve_tokens: int,
        prompt_tokens: int,
        lease_ms: int,
        parked_entry: bytes | None,
        waiting_since_ms: int,
        handoff: str | None = None,
    ) -> Admission:
        """Take a slot and reserve the tokens, or park the entry in its user's line (when given)."""
        result = self._admit(
            args=[
                *self._args(lane, lease_ms),
                holder,
                handoff or "",
                user_id,
                reserve_tokens,
                prompt_tokens,
                parked_entry or b"",
                waiting_since_ms,
                lane.label(),
            ]
        )
        admitted, reason, *entries = cast(list[bytes | int], result)
        reason_text = reason.decode() if isinstance(reason, bytes) else str(reason)
        return Admission(bool(admitted), reason_text, [bytes(e) for e in entries if isinstance(e, bytes)])

    def release(self, lane: Lane, holder: str | None, *, settle_tokens: int, lease_ms: int) -> Released:
        """Free ``holder``'s slot, settle its tokens, and hand free capacity to waiting messages, round-robin.

        ``settle_tokens`` is the request's real usage, ``KEEP_RESERVATION`` or ``NOT_SENT``. With no holder
        it only hands off (the sweep).
        """
        result = cast(
            list[bytes | int],
            self._release(args=[*self._args(lane, lease_ms), holder or "", settle_tokens]),
        )
        until, next_free, *entries = result
        return Released(int(until), int(next_free), [bytes(e) for e in entries if isinstance(e, bytes)])

    def pause(self, lane: Lane, *, holder: str, retry_after_s: float | None, lease_ms: int, reason: str) -> int:
        """Pause the lane after a 429/529 for ``retry_after_s``, or the backing-off default; returns until (ms)."""
        config = lane.config
        retry_after_ms = -1 if retry_after_s is None else math.ceil(retry_after_s * 1000)
        until = self._pause(
            args=[
                *self._args(lane, lease_ms),
                holder,
                retry_after_ms,
                int(config.pause_s * 1000),
                int(config.max_pause_s * 1000),
                reason,
            ]
        )
        return int(cast(int, until))

    def sending(self, lane: Lane, holder: str, *, lease_ms: int) -> int:
        """Right before ``holder``'s request leaves: 0 and its window entry re-stamped to now, or, when the
        lane was paused meanwhile (and ``holder`` is not its probe), when the pause ends (ms)."""
        return int(cast(int, self._sending(args=[*self._args(lane, lease_ms), holder, 0])))

    def answering(self, lane: Lane, holder: str, *, lease_ms: int) -> None:
        """The first byte of ``holder``'s answer arrived: its request counts in the window from now.

        The provider has surely counted it by then, so a slow start (a new connection, a loaded machine)
        never lets the lane's window forget a request that the provider's window still holds.
        """
        self._sending(args=[*self._args(lane, lease_ms), holder, 1])

    def paused_until(self, lane: Lane) -> tuple[int, str]:
        """When the lane's pause ends (ms since the epoch, 0: never paused) and who probes it (holder or '')."""
        until, probe = cast(
            list[bytes | None], self._client.hmget(f"{self._prefix}state:{lane.lane_id}", ["until", "probe"])
        )
        return int(until or 0), (probe or b"").decode()

    def renew(self, held: list[tuple[Lane, str]], *, lease_ms: int) -> None:
        """Extend the leases of the holders this process has in flight (``XX``: a released one stays gone)."""
        if not held:
            return
        expiry = now_ms() + lease_ms
        pipe = self._client.pipeline(transaction=False)
        for lane, holder in held:
            pipe.zadd(f"{self._prefix}slots:{lane.lane_id}", {holder: expiry}, xx=True)
        pipe.execute()

    def expired_waiting(self, lane: Lane, *, older_than_ms: int, lease_ms: int) -> list[bytes]:
        """Take out of line every entry that has waited longer than ``older_than_ms``; their entries."""
        result = self._expired(args=[*self._args(lane, lease_ms), now_ms() - older_than_ms])
        return [bytes(e) for e in cast(list[bytes], result)]

    def handed_off(self, message_id: str) -> None:
        """Drop the safety copy of a handed-off message once it is enqueued."""
        self._client.hdel(self.handoffs_key, message_id)

    def stale_handoffs(self, older_than_ms: int) -> list[tuple[str, bytes]]:
        """Handed-off messages never confirmed enqueued (their process died): (message id, body)."""
        cutoff = now_ms() - older_than_ms
        stale = []
        for holder, value in cast(dict[bytes, bytes], self._client.hgetall(self.handoffs_key)).items():
            stamp, _, body = value.partition(b"\n")
            if int(stamp) < cutoff:
                stale.append((holder.decode(), body))
        return stale

    def stats(self, lane: Lane, *, lease_ms: int = 30_000) -> LaneStats:
        """The lane's current window, slots, pause and line (expired leases are collected first)."""
        raw = cast(list[bytes | int], self._stats(args=self._args(lane, lease_ms)))
        requests, tokens, slots, waiting, until, probing, limited, episodes, _reason = raw
        return LaneStats(
            lane_id=lane.lane_id,
            label=lane.label(),
            requests=int(requests),
            tokens=int(tokens),
            slots=int(slots),
            waiting=int(waiting),
            paused_until_ms=int(until),
            probing=probing in (b"1", "1", 1),
            rate_limited=int(limited),
            pause_episodes=int(episodes),
        )
