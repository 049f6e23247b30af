"""Actors module for ``bench/idle.py``: the real actors, plus (with ``BENCH_PICKUP_DRIVER=1``) a driver actor
that enqueues generations from inside the worker process, to time pickup of a job sent by the same process.

Run as ``dramatiq bench.idle_actors``. Without the variable it is exactly ``actors`` (no extra queue polled).
"""

from __future__ import annotations

import os
import time

import dramatiq
import redis

import actors

SENT_KEY = "bench:pickup:sent"
DRIVER = "bench_driver"

if os.environ.get("BENCH_PICKUP_DRIVER") == "1":
    _client = redis.Redis.from_url(actors.settings.redis_url)

    @dramatiq.actor(queue_name=DRIVER, max_retries=0, time_limit=3_600_000)
    def drive_pickup(prefix: str, count: int, interval_ms: int) -> None:
        """Enqueue ``count`` generations through the API, ``interval_ms`` apart, recording each send time."""
        for index in range(count):
            job_id = f"{prefix}-{index}"
            params = {"model": "bench", "messages": [{"role": "user", "content": f"go [[{job_id}]]"}]}
            _client.hset(SENT_KEY, job_id, time.time())
            actors.enqueue_generation(user_id=f"{prefix}-u{index}", params=params, job_id=job_id)
            time.sleep(interval_ms / 1000)
