"""Cancelling a job: the compare-and-set in the store, shared by ``cancel_job`` and ``cancel_llm_job``."""

from __future__ import annotations

import logging

from repositories.store import JobStore

logger = logging.getLogger(__name__)


def cancel(store: JobStore, job_id: str, user_id: str) -> bool:
    """Cancel the user's pending or processing job; a processing one stops at its next heartbeat.

    Returns False when the job is unknown, belongs to another user, or is already finished.
    """
    cancelled = store.cancel(job_id, user_id=user_id)
    if cancelled:
        logger.info("job cancelled", extra={"job_id": job_id, "user_id": user_id})
    return cancelled
