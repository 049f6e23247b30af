"""Dramatiq actors and the web-facing API. Importing this package configures the broker.

Web code::

    from actors import enqueue_generation, get_job
    job_id = enqueue_generation(user_id="u1", params={"model": "...", "messages": [...]})

Workers: ``dramatiq actors``. Importing builds the default ``JobQueue`` (``actors.queue``) from the
environment, binds the actors to it and makes its broker Dramatiq's global one; nothing connects yet.
"""

from __future__ import annotations

from actors import log_redaction
from actors.api import cancel_job, enqueue_generation, enqueue_preview, get_job, user_loads
from actors.jobs import JobFailed
from actors.payloads import GenerationParams
from actors.queue import JobQueue
from actors.tasks import (
    cancel_llm_job,
    cleanup_old_jobs,
    generate_llm_response,
    generate_preview,
)
from actors.wiring import register_configured_secrets
from repositories.sql_deadline import StoreUnavailable
from repositories.store import Job, JobKind, JobStatus
from settings import load_settings

settings = load_settings()
register_configured_secrets(settings)
log_redaction.install()
#: The default queue, built from the environment: the one ``dramatiq actors`` and the API functions use.
default_queue = JobQueue(settings)
default_queue.bind()
broker = default_queue.broker

__all__ = [
    "GenerationParams",
    "Job",
    "JobFailed",
    "JobKind",
    "JobQueue",
    "JobStatus",
    "StoreUnavailable",
    "broker",
    "cancel_job",
    "cancel_llm_job",
    "cleanup_old_jobs",
    "default_queue",
    "enqueue_generation",
    "enqueue_preview",
    "generate_llm_response",
    "generate_preview",
    "get_job",
    "settings",
    "user_loads",
]
