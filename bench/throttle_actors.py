"""Actors module for ``bench/throttle.py``: the real actors, a delivery counter, and the naive baseline.

Run as ``dramatiq bench.throttle_actors``. The naive baseline is what the design card's first idea
would give: Dramatiq's stock ``ConcurrentRateLimiter`` acquired inside the actor with
``raise_on_failure``, so a throttled job raises ``RateLimitExceeded`` and is retried with backoff.
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
import redis
from dramatiq.rate_limits import ConcurrentRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

import actors
from actors.jobs import InvalidPayload, JobFailed
from actors.queue import current
from actors.retry_policy import GENERATE_MAX_RETRIES
from actors.tasks import _delivery
from middleware.throttle import UserThrottle

DELIVERIES_KEY = "bench:deliveries"
NAIVE_LIMIT = int(os.environ.get("GENERATE_USER_CONCURRENCY", "5"))

_client = redis.Redis.from_url(actors.settings.redis_url)


class DeliveryCounter(dramatiq.Middleware):
    """Counts every delivery of every message (``HINCRBY bench:deliveries <message_id>``)."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Count the delivery before any throttling decides anything."""
        _client.hincrby(DELIVERIES_KEY, message.message_id, 1)


actors.broker.add_middleware(DeliveryCounter(), before=UserThrottle)

if os.environ.get("BENCH_WAKE_IDLE_CONSUMERS") == "false":
    # The baseline of the wake-ups: idle consumers find handed-off messages by polling alone.
    actors.broker.wake_idle_consumers = False

_backend = RedisBackend(client=_client)


@dramatiq.actor(queue_name="bench_naive", max_retries=GENERATE_MAX_RETRIES, throws=(JobFailed, InvalidPayload))
def generate_naive(job_id: str, user_id: str, params: dict[str, Any]) -> None:
    """The generation actor behind the stock limiter: throttled means ``RateLimitExceeded`` and a retry."""
    from actors.payloads import GenerateMessage

    message = GenerateMessage(job_id=job_id, user_id=user_id, params=params)
    limiter = ConcurrentRateLimiter(_backend, f"bench-naive:{user_id}", limit=NAIVE_LIMIT)  # type: ignore[no-untyped-call]
    with limiter.acquire(raise_on_failure=True):
        current().runner.run_generation(message, _delivery())
