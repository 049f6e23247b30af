"""Dramatiq actors and the web-facing API. Importing this package configures the broker.

Web code::

    from actors import enqueue_generation, get_job
    job_id = enqueue_generation(user_id="u1", params={"model": "...", "messages": [...]})

Workers: ``dramatiq actors``.
"""

from __future__ import annotations

import dramatiq

from actors import log_redaction, runtime
from actors.wiring import (
    actor_options,
    build_broker,
    build_runtime,
    job_metrics,
    lane_gate,
    register_configured_secrets,
)
from settings import load_settings

settings = load_settings()
register_configured_secrets(settings)
log_redaction.install()
metrics = job_metrics(settings)
lanes = lane_gate(settings, metrics)
broker = build_broker(settings, metrics, lanes)
dramatiq.set_broker(broker)
runtime.configure(lambda: build_runtime(settings, metrics, lanes), actor_options(settings))

from actors.api import cancel_job, enqueue_generation, enqueue_preview, get_job, user_loads  # noqa: E402
from actors.jobs import JobFailed  # noqa: E402
from actors.payloads import GenerationParams  # noqa: E402
from actors.tasks import (  # noqa: E402
    cancel_llm_job,
    cleanup_old_jobs,
    generate_llm_response,
    generate_preview,
)
from repositories.sql_deadline import StoreUnavailable  # noqa: E402
from repositories.store import Job, JobKind, JobStatus  # noqa: E402

__all__ = [
    "GenerationParams",
    "Job",
    "JobFailed",
    "JobKind",
    "JobStatus",
    "StoreUnavailable",
    "broker",
    "cancel_job",
    "cancel_llm_job",
    "cleanup_old_jobs",
    "enqueue_generation",
    "enqueue_preview",
    "generate_llm_response",
    "generate_preview",
    "get_job",
    "settings",
    "user_loads",
]
