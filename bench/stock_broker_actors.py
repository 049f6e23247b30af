"""The real actors on Dramatiq's stock Redis broker settings: the baseline of ``bench/recovery.py``.

Run as ``dramatiq bench.stock_broker_actors``.
"""

from __future__ import annotations

from dramatiq.brokers.redis import DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_MAINTENANCE_CHANCE

import actors
from brokers.waking_redis import WakingRedisBroker
from middleware.worker_tuning import WorkerTuning

if not isinstance(actors.broker, WakingRedisBroker):
    raise SystemExit("bench/recovery.py measures the Redis broker: unset BROKER_URL")
actors.broker.heartbeat_timeout = DEFAULT_HEARTBEAT_TIMEOUT
actors.broker.maintenance_chance = DEFAULT_MAINTENANCE_CHANCE
for _middleware in actors.broker.middleware:
    if isinstance(_middleware, WorkerTuning):
        _middleware.poll_interval_ms = 1000  # Dramatiq's default idle backoff cap
        _middleware.prefetch_per_thread = 2  # Dramatiq's default prefetch
