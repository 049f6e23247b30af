"""A loopback OpenRouter that enforces a provider quota per API key, the way a real account's rate limit does.

Per key (the ``Authorization`` header), in a sliding window: at most ``requests`` requests and ``tokens``
tokens, counting the prompt (as its usage chunk reports it) and every token it actually generates. Over
the quota it answers 429 with ``Retry-After`` = the whole seconds until enough capacity frees (or none,
with ``send_retry_after=False``, like the Claude Code CLI hides it). Scripted replies still win, so a test
can force a 429 of its own. Each answer generates ``[[answer=N]]`` tokens if the prompt says so, else
``max_tokens`` (16 when absent), one chunk per token, ``token_delay_s`` apart.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from dataclasses import dataclass, field

from tests.loopback.openrouter import OpenRouterServer, RecordedRequest, Reply

_ANSWER = re.compile(r"\[\[answer=(\d+)\]\]")


@dataclass
class _Use:
    at: float
    tokens: int
    index: int


@dataclass
class KeyQuota:
    """What the server counted for one key: its uses in the window, and every request and 429 ever."""

    uses: list[_Use] = field(default_factory=list)
    requests: int = 0
    rate_limited: int = 0


class QuotaServer(OpenRouterServer):
    """OpenRouter imitation with a per-key sliding-window quota of requests and tokens (see the module)."""

    label = "Quota"

    def __init__(
        self,
        *,
        requests: int = 120,
        tokens: int = 30_000,
        window_s: float = 60.0,
        token_delay_s: float = 0.0,
        send_retry_after: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.quota_requests = requests
        self.quota_tokens = tokens
        self.window_s = window_s
        self.token_delay_s = token_delay_s
        self.send_retry_after = send_retry_after
        self._keys: dict[str, KeyQuota] = {}
        self._use_of: dict[int, _Use] = {}
        self._quota_lock = threading.Lock()

    # -- counts ---------------------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """Every request received, over every key."""
        with self._quota_lock:
            return sum(quota.requests for quota in self._keys.values())

    @property
    def rate_limited_count(self) -> int:
        """Every 429 answered, over every key."""
        with self._quota_lock:
            return sum(quota.rate_limited for quota in self._keys.values())

    def rate_limited_requests(self) -> list[RecordedRequest]:
        """The recorded requests answered with 429."""
        return [r for r in self.requests if r.reply is not None and r.reply.status == 429]

    def tokens_served(self) -> int:
        """Prompt and generated tokens of every request answered (not 429s), over every key."""
        with self._quota_lock:
            return sum(use.tokens for use in self._use_of.values())

    def reset_quota(self) -> None:
        """Forget every key's window and counts (and the recorded requests)."""
        with self._quota_lock:
            self._keys.clear()
            self._use_of.clear()
        self.reset()

    # -- the quota ------------------------------------------------------------------------------

    def _pick_reply(self, record: RecordedRequest) -> Reply:
        now = time.time()
        key = record.headers.get("authorization", "")
        scripted = any(queue and record.matches(k) for k, queue in self._keyed.items()) or bool(self._fifo)
        with self._quota_lock:
            quota = self._keys.setdefault(key, KeyQuota())
            quota.requests += 1
            if scripted:
                reply = super()._pick_reply(record)
                if reply.status == 429:
                    quota.rate_limited += 1
                return reply
            quota.uses = [use for use in quota.uses if use.at > now - self.window_s]
            wait_s = self._wait_for_capacity(quota, now)
            if wait_s > 0:
                quota.rate_limited += 1
                retry_after = str(max(1, math.ceil(wait_s))) if self.send_retry_after else None
                return Reply.error(429, retry_after=retry_after, message="Rate limit exceeded: quota per key")
            prompt_tokens = max(1, len(json.dumps(record.body.get("messages", ""))) // 4)
            use = _Use(now, prompt_tokens, record.index)
            quota.uses.append(use)
            self._use_of[record.index] = use
        answer = _ANSWER.search(record.last_message_text)
        max_tokens = record.body.get("max_tokens")
        count = int(answer.group(1)) if answer else max_tokens if isinstance(max_tokens, int) else 16
        if isinstance(max_tokens, int):
            count = min(count, max_tokens)
        return Reply.ok(*["tok "] * max(1, count), chunk_delay_s=self.token_delay_s, keepalive_comments=False)

    def _wait_for_capacity(self, quota: KeyQuota, now: float) -> float:
        """Seconds until the key may send again (0: now): the oldest uses must leave the window first."""
        uses = sorted(quota.uses, key=lambda use: use.at)
        frees_at = now
        if len(uses) >= self.quota_requests:
            frees_at = max(frees_at, uses[len(uses) - self.quota_requests].at + self.window_s)
        used = sum(use.tokens for use in uses)
        for use in uses:
            if used < self.quota_tokens:
                break
            used -= use.tokens
            frees_at = max(frees_at, use.at + self.window_s)
        return frees_at - now

    def _chunk_sent(self, record: RecordedRequest) -> None:
        super()._chunk_sent(record)
        with self._quota_lock:
            use = self._use_of.get(record.index)
            if use is not None:
                use.tokens += 1
