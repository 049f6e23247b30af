"""The worker tuning of the RabbitMQ broker (``brokers.rabbitmq``): its prefetch."""

from __future__ import annotations

import logging
from typing import Any

import dramatiq

from middleware.worker_tuning import ClosableWorkQueue, stop_worker_threads

logger = logging.getLogger(__name__)


class RabbitmqTuning(dramatiq.Middleware):
    """Hold at most ``prefetch_per_thread`` unacked messages per worker thread and queue (RabbitMQ's QoS).

    Dramatiq prefetches twice the thread count by default; LLM jobs run for minutes, so a message
    prefetched by a busy process would wait there while another process idles. The worker's own
    timeout (how long a consumer waits for a push before it looks at its delayed messages) is left at
    Dramatiq's default.

    Parameters:
      prefetch_per_thread: messages held per worker thread and queue (at least 1).
    """

    def __init__(self, *, prefetch_per_thread: int = 1) -> None:
        if prefetch_per_thread < 1:
            raise ValueError("prefetch_per_thread must be at least 1")
        self.prefetch_per_thread = prefetch_per_thread

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Set the prefetch before the worker starts its consumers."""
        worker.queue_prefetch = max(1, worker.worker_threads * self.prefetch_per_thread)
        worker.work_queue = ClosableWorkQueue()
        logger.debug("RabbitMQ prefetch %d per queue", worker.queue_prefetch)

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Let idle worker threads stop at once (``worker_tuning.stop_worker_threads``)."""
        stop_worker_threads(worker)
