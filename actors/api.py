"""The web-facing API: enqueue, cancel and read jobs. Validation happens before anything is written."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
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
from actors.reconciler import Reconciler, job_message
from actors.tasks import generate_llm_response, generate_preview
from middleware.limiters import RedisLeaseStore, UserLoad
from middleware.throttle import throttle_of
from repositories.sql_deadline import store_unavailable
from repositories.store import Job, JobKind, JobStatus

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


def resend_unsent(*, older_than_s: float = 60.0, lease_s: float | None = None) -> int:
    """Re-send every job that lost its message: the reconciler's sweep (``actors.reconciler``).

    Pending jobs untouched for ``older_than_s`` seconds (their sender died before sending, or Redis
    lost the message) and processing jobs whose heartbeat is older than ``lease_s`` (default: the
    job lease) are re-sent when no message for them lives in Redis, without spending a retry. Run
    periodically by the scheduler; safe in several processes at once. Returns how many were re-sent.
    """
    return reconciler(pending_after_s=older_than_s, lease_s=lease_s).sweep()


def reconciler(*, pending_after_s: float = 60.0, lease_s: float | None = None) -> Reconciler:
    """The reconciler of this process's store and broker, with the given bounds in seconds."""
    current = runtime.current()
    broker = dramatiq.get_broker()
    throttle = throttle_of(broker)
    leases = throttle.leases if throttle is not None and isinstance(throttle.leases, RedisLeaseStore) else None
    return Reconciler(
        store=current.store,
        broker=broker,
        leases=leases,
        lease_s=lease_s if lease_s is not None else current.runner.lease_s,
        pending_after_s=pending_after_s,
        send=lambda job, delay_ms: _send_message(broker, job_message(broker, job), delay_ms),
    )


def _send_message(broker: dramatiq.Broker, message: dramatiq.Message[Any], delay_ms: int) -> None:
    """Enqueue ``message`` (after ``delay_ms``), or park it behind its user's throttled backlog."""
    if delay_ms > 0:
        broker.enqueue(message, delay=delay_ms)
        return
    throttle = throttle_of(broker)
    if throttle is None or not throttle.park_behind_backlog(broker, message):
        broker.enqueue(message)


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
