"""Report configuration problems when a worker boots, instead of at its first job."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import dramatiq

logger = logging.getLogger(__name__)


class ConfigurationCheck(dramatiq.Middleware):
    """Run ``check`` when the worker boots and log its error in one clear line.

    The worker still starts, so ``dramatiq actors`` works with only ``REDIS_URL`` set; jobs that need
    the missing piece fail at once with the same message instead of being retried.

    Parameters:
      check: raises an exception whose message names the missing or invalid setting.
    """

    def __init__(self, *, check: Callable[[], None]) -> None:
        self.check = check

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Log the configuration problem, if any."""
        try:
            self.check()
        except Exception as exc:
            logger.error("configuration problem: %s; jobs that need it will fail until it is fixed", exc)
