"""Size the worker's prefetch for long jobs."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

logger = logging.getLogger(__name__)


class QueuePrefetch(dramatiq.Middleware):
    """Limit how many messages each worker process holds per queue beyond the ones it runs.

    Dramatiq prefetches twice the thread count by default, which suits short tasks. LLM jobs run for
    minutes, so a message prefetched by a busy process waits there while another process idles.
    With ``per_thread=1`` a process holds at most one message per worker thread and queue.

    Parameters:
      per_thread: messages prefetched per worker thread and queue (at least 1).
    """

    def __init__(self, *, per_thread: int = 1) -> None:
        if per_thread < 1:
            raise ValueError("per_thread must be at least 1")
        self.per_thread = per_thread

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Set the prefetch before the worker starts its consumers."""
        worker.queue_prefetch = max(1, worker.worker_threads * self.per_thread)
        logger.debug("queue prefetch set to %d", worker.queue_prefetch)
