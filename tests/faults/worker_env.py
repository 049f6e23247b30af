"""The environment of a worker process under a fault test: its own Redis, its own store, a loopback provider."""

from __future__ import annotations

import os

from tests.harness import PROJECT_ROOT


def fault_worker_env(*, redis_url: str, database_url: str, provider_url: str, **extra: str) -> dict[str, str]:
    """Settings for ``dramatiq actors`` pointed at the test's own services (fast retries, short leases)."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "OPENROUTER_BASE_URL": provider_url,
        "PROGRESS_INTERVAL_MS": "200",
        "BROKER_HEARTBEAT_TIMEOUT_MS": "5000",
        "JOB_LEASE_S": "10",
        "SHUTDOWN_GRACE_S": "2",
        "RETRY_MIN_BACKOFF_MS": "100",
        "RETRY_MAX_BACKOFF_MS": "400",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    env.update(extra)
    return env
