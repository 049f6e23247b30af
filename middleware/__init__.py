"""Dramatiq middleware of the service: per-user throttling with a pluggable limiter, worker tuning."""

from __future__ import annotations

from middleware.prefetch import QueuePrefetch
from middleware.startup import ConfigurationCheck

__all__ = ["ConfigurationCheck", "QueuePrefetch"]
