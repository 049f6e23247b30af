"""Dramatiq middleware of the service: per-user throttling (``UserThrottle``, the hooks of ``admission``'s
pluggable limits), attempt tokens, bad messages, graceful shutdown, logs, metrics and worker tuning."""

from __future__ import annotations

from middleware.startup import ConfigurationCheck
from middleware.throttle import UserThrottle
from middleware.worker_tuning import WorkerTuning

__all__ = ["ConfigurationCheck", "UserThrottle", "WorkerTuning"]
