"""Size the worker's prefetch and idle polling for long jobs, and wake idle consumers on local enqueues."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from middleware.consumer_recovery import use_resilient_consumers

logger = logging.getLogger(__name__)


class WorkerTuning(dramatiq.Middleware):
    """Set how many messages a worker process holds per queue, how long an idle consumer sleeps, and make
    its consumer threads keep their delayed messages through Redis reconnects (``consumer_recovery``).

    Dramatiq prefetches twice the thread count by default, which suits short tasks. LLM jobs run for
    minutes, so a message prefetched by a busy process waits there while another process idles.
    An idle Redis consumer backs off up to its timeout (1 s by default) between polls; a message
    handed a throttle slot by another process would wait that long, so idle polling is capped lower.
    (A message enqueued by the same process wakes its consumer at once: see ``WakingRedisBroker``.)

    Parameters:
      prefetch_per_thread: messages held per worker thread and queue (at least 1).
      poll_interval_ms: the longest an idle consumer sleeps between polls, in milliseconds.
    """

    def __init__(self, *, prefetch_per_thread: int = 1, poll_interval_ms: int = 100) -> None:
        if prefetch_per_thread < 1:
            raise ValueError("prefetch_per_thread must be at least 1")
        if poll_interval_ms < 10:
            raise ValueError("poll_interval_ms must be at least 10")
        self.prefetch_per_thread = prefetch_per_thread
        self.poll_interval_ms = poll_interval_ms

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Set the prefetch and polling before the worker starts its consumers."""
        worker.queue_prefetch = max(1, worker.worker_threads * self.prefetch_per_thread)
        worker.worker_timeout = self.poll_interval_ms
        use_resilient_consumers(worker)
        logger.debug("prefetch %d per queue, idle poll every %d ms", worker.queue_prefetch, self.poll_interval_ms)
