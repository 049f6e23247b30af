"""Dramatiq middleware of the service: per-user throttling with a pluggable limiter, worker tuning."""

from __future__ import annotations

from middleware.prefetch import QueuePrefetch

__all__ = ["QueuePrefetch"]
