"""The web-facing API: enqueue, cancel and read jobs. Validation happens before anything is written."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import dramatiq

from actors import runtime
from actors.payloads import (
    GenerateMessage,
    GenerationParams,
    JobRef,
    PreviewMessage,
    is_job_id,
    limits_context,
    new_job_id,
)
from actors.tasks import generate_llm_response, generate_preview
from middleware.limiters import UserLoad
from middleware.throttle import throttle_of
from repositories.sql_deadline import store_unavailable
from repositories.store import Job, JobKind, JobStatus, utcnow

logger = logging.getLogger(__name__)


def enqueue_generation(user_id: str, params: GenerationParams | dict[str, Any], *, job_id: str | None = None) -> str:
    """Queue a generation for ``user_id`` and return its job id; the same ``job_id`` twice is one job.

    Raises ``ValueError`` (a pydantic ``ValidationError``) naming the bad field; nothing is then written.
    Raises ``StoreUnavailable`` when the job store does not answer within its timeouts.
    """
    message = GenerateMessage.model_validate(
        {"job_id": job_id or new_job_id(), "user_id": user_id, "params": params}, context=_limits()
    )
    payload = message.model_dump(mode="json", exclude_none=True)
    _submit(
        message.job_id,
        message.user_id,
        JobKind.GENERATE,
        payload["params"],
        lambda: _send(generate_llm_response, payload),
    )
    return message.job_id


def enqueue_preview(user_id: str, title: str, content: str, *, job_id: str | None = None) -> str:
    """Queue a tile preview for ``user_id`` and return its job id; the same ``job_id`` twice is one job."""
    message = PreviewMessage.model_validate(
        {"job_id": job_id or new_job_id(), "user_id": user_id, "title": title, "content": content},
        context=_limits(),
    )
    payload = message.model_dump(mode="json")
    _submit(
        message.job_id,
        message.user_id,
        JobKind.PREVIEW,
        {"title": title, "content": content},
        lambda: _send(generate_preview, payload),
    )
    return message.job_id


def _limits() -> dict[str, Any]:
    return limits_context(runtime.options().max_request_bytes)


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Turn a store outage or timeout into ``StoreUnavailable`` (its text carries no SQL and no prompt)."""
    try:
        yield
    except Exception as exc:
        unavailable = store_unavailable(exc)
        if unavailable is None:
            raise
        raise unavailable from None


def _submit(job_id: str, user_id: str, kind: JobKind, request: dict[str, Any], send: Callable[[], object]) -> None:
    """Write the pending row, then send the message; a row whose message never left is sent again."""
    store = runtime.current().store
    with _store_errors():
        created = store.create(job_id=job_id, user_id=user_id, kind=kind, request=request)
        existing = None if created else store.get(job_id)
    if not created:
        if existing is not None and existing.user_id != user_id:
            # The same answer as a duplicate of one's own job: nothing tells that this id is someone else's.
            logger.warning("enqueue ignored: job_id belongs to another user", extra={"job_id": job_id})
            return
        if existing is not None and existing.kind is not kind:
            raise ValueError(f"job_id: {job_id!r} is already used by another job")
        if existing is None or existing.status is not JobStatus.PENDING or existing.enqueued_at is not None:
            logger.info("duplicate enqueue ignored", extra={"job_id": job_id, "user_id": user_id})
            return
        logger.info("re-sending a job whose message was never confirmed", extra={"job_id": job_id})
    try:
        send()
    except Exception:
        with _store_errors():
            store.delete_unsent(job_id)
        raise
    with _store_errors():
        store.mark_enqueued(job_id)
    logger.info("job enqueued", extra={"job_id": job_id, "user_id": user_id, "kind": str(kind)})


def _send(actor: dramatiq.Actor[..., Any], kwargs: dict[str, Any]) -> None:
    """``actor.send(**kwargs)``, except that a user with parked jobs gets this one parked behind them."""
    message = actor.message(**kwargs)
    throttle = throttle_of(actor.broker)
    if throttle is None or not throttle.park_behind_backlog(actor.broker, message):
        actor.broker.enqueue(message)


def resend_unsent(*, older_than_s: float = 60.0) -> int:
    """Send the message of every pending job whose sender died between writing it and sending it.

    Run periodically by the scheduler. A duplicate message is harmless: only one can own the job.
    """
    store = runtime.current().store
    resent = 0
    for job in store.unsent_before(utcnow() - timedelta(seconds=older_than_s)):
        if job.kind is JobKind.GENERATE:
            _send(generate_llm_response, {"job_id": job.job_id, "user_id": job.user_id, "params": job.request})
        else:
            _send(generate_preview, {"job_id": job.job_id, "user_id": job.user_id, **job.request})
        store.mark_enqueued(job.job_id)
        logger.warning("re-sent a job whose message was never sent", extra={"job_id": job.job_id})
        resent += 1
    return resent


def cancel_job(job_id: str, user_id: str) -> bool:
    """Cancel a pending or processing job of ``user_id``; False if unknown, another user's or finished."""
    if not isinstance(job_id, str) or not isinstance(user_id, str):
        return False
    JobRef.model_validate({"job_id": job_id, "user_id": user_id})
    with _store_errors():
        return runtime.current().cancel(job_id, user_id)


def get_job(job_id: str, user_id: str | None = None) -> Job | None:
    """The job, or None when unknown or (with ``user_id``) another user's."""
    if not is_job_id(job_id):
        return None  # e.g. a NUL byte: no job can have this id, and the store need not be asked
    with _store_errors():
        job = runtime.current().store.get(job_id)
    if job is None or (user_id is not None and job.user_id != user_id):
        return None
    return job


def user_loads() -> list[UserLoad]:
    """Jobs running and waiting for a throttle slot, per actor and user, across every worker."""
    throttle = throttle_of(dramatiq.get_broker())
    return throttle.loads() if throttle is not None else []
