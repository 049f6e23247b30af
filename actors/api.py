"""The web-facing API of the contract: thin wrappers over the queue the actors are bound to.

``import actors`` binds them to the default ``JobQueue`` (``actors.queue``), built from the
environment; the methods of that object are the implementation.
"""

from __future__ import annotations

from typing import Any

from actors.payloads import GenerationParams
from actors.queue import current
from actors.reconciler import Reconciler
from admission.leases import UserLoad
from repositories.store import Job


def enqueue_generation(user_id: str, params: GenerationParams | dict[str, Any], *, job_id: str | None = None) -> str:
    """Queue a generation for ``user_id`` and return its job id; the same ``job_id`` twice is one job.

    Raises ``ValueError`` (a pydantic ``ValidationError``) naming the bad field; nothing is then written.
    Raises ``StoreUnavailable`` when the job store does not answer within its timeouts.
    """
    return current().enqueue_generation(user_id, params, job_id=job_id)


def enqueue_preview(user_id: str, title: str, content: str, *, job_id: str | None = None) -> str:
    """Queue a tile preview for ``user_id`` and return its job id; the same ``job_id`` twice is one job."""
    return current().enqueue_preview(user_id, title, content, job_id=job_id)


def cancel_job(job_id: str, user_id: str) -> bool:
    """Cancel a pending or processing job of ``user_id``; False if unknown, another user's or finished."""
    return current().cancel_job(job_id, user_id)


def get_job(job_id: str, user_id: str | None = None) -> Job | None:
    """The job, or None when unknown or (with ``user_id``) another user's."""
    return current().get_job(job_id, user_id)


def user_loads() -> list[UserLoad]:
    """Jobs running and waiting for a throttle slot, per actor and user, across every worker."""
    return current().user_loads()


def resend_unsent(*, older_than_s: float = 60.0, lease_s: float | None = None) -> int:
    """Re-send every job that lost its message: the reconciler's sweep (``actors.reconciler``).

    Pending jobs untouched for ``older_than_s`` seconds (their sender died before sending, or Redis
    lost the message) and processing jobs whose heartbeat is older than ``lease_s`` (default: the
    job lease) are re-sent when no message for them lives in Redis, without spending a retry. Run
    periodically by the scheduler; safe in several processes at once. Returns how many were re-sent.
    """
    return current().resend_unsent(older_than_s=older_than_s, lease_s=lease_s)


def reconciler(*, pending_after_s: float = 60.0, lease_s: float | None = None) -> Reconciler:
    """The reconciler of the bound queue's store and broker, with the given bounds in seconds."""
    return current().reconciler(pending_after_s=pending_after_s, lease_s=lease_s)
