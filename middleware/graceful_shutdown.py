"""Give running jobs a grace period on SIGTERM, then hand them back to the queue."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import dramatiq

logger = logging.getLogger(__name__)


class GracefulShutdown(dramatiq.Middleware):
    """When the worker starts shutting down, wait ``grace_ms``, then call ``hand_back``.

    Dramatiq lets running actors finish up to ``--worker-shutdown-timeout`` and then exits with
    ``os._exit``, killing any stream (and any Claude Code CLI child) without clean-up. A generation
    can run for minutes, so instead: jobs that end within the grace period end normally; the rest
    close their provider stream and go back to the queue for another worker, without using a retry.
    Keep ``grace_ms`` below ``--worker-shutdown-timeout``.

    Parameters:
      grace_ms: how long running jobs may go on after SIGTERM, in milliseconds.
      hand_back: stops the running jobs of this process and re-enqueues them.
    """

    def __init__(self, *, grace_ms: int, hand_back: Callable[[], object]) -> None:
        self.grace_ms = grace_ms
        self.hand_back = hand_back
        self._timer: threading.Timer | None = None

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Start the grace period."""
        self._timer = threading.Timer(self.grace_ms / 1000, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Every job ended in time: no hand-back needed."""
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        try:
            self.hand_back()
        except Exception:
            logger.exception("handing running jobs back failed")
