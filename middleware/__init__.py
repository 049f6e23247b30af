"""Dramatiq middleware of the service: per-user throttling with a pluggable limiter, worker tuning."""

from __future__ import annotations

from middleware.limiters import (
    BucketLimit,
    ConcurrencyLimit,
    MemoryLeaseStore,
    RedisLeaseStore,
    StartRateGate,
    UserLimit,
    UserLoad,
    WindowLimit,
)
from middleware.startup import ConfigurationCheck
from middleware.throttle import UserThrottle
from middleware.worker_tuning import WorkerTuning

__all__ = [
    "BucketLimit",
    "ConcurrencyLimit",
    "ConfigurationCheck",
    "MemoryLeaseStore",
    "RedisLeaseStore",
    "StartRateGate",
    "UserLimit",
    "UserLoad",
    "UserThrottle",
    "WindowLimit",
    "WorkerTuning",
]
