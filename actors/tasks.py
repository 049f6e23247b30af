"""The Dramatiq actors. Names and arguments are part of the public contract.

The actors are declared once, unbound; a ``JobQueue`` (``actors.queue``) binds them to its broker and
gives them its options (``bind``). ``import actors`` binds them to the default queue. An actor runs
with the queue it is bound to: its store, its runner, its options.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage
from pydantic import BaseModel, ValidationError

from actors.jobs import Delivery, InvalidPayload
from actors.payloads import (
    GenerateMessage,
    JobRef,
    PreviewMessage,
    describe_validation_error,
    limits_context,
    salvage_identity,
)
from middleware.attempts import attempt_token_of
from repositories.store import JobKind, utcnow

if TYPE_CHECKING:
    from actors.queue import JobQueue

logger = logging.getLogger(__name__)

#: The actor that runs each kind of job.
JOB_ACTOR_NAMES = {JobKind.GENERATE: "generate_llm_response", JobKind.PREVIEW: "generate_preview"}

Payload = TypeVar("Payload", bound=BaseModel)

#: Where the actors live until a queue binds them: a broker with no middleware, which nothing consumes.
_UNBOUND = StubBroker(middleware=[])
_bound: JobQueue | None = None
_bind_lock = threading.Lock()


def bind(queue: JobQueue) -> JobQueue | None:
    """Bind every actor to ``queue``: declared on its broker, with its options. Returns the queue bound before."""
    global _bound
    with _bind_lock:
        previous = _bound
        for actor in ACTORS:
            actor.broker = queue.broker
            actor.options = queue.options.for_actor(actor.actor_name, queue.retry_policy)
            queue.broker.declare_actor(actor)
        dramatiq.set_broker(queue.broker)
        _bound = queue
        return previous


def bound_queue() -> JobQueue:
    """The queue the actors are bound to."""
    if _bound is None:
        raise RuntimeError("the actors are bound to no queue: import actors first")
    return _bound


def _delivery() -> Delivery:
    """The current message as the runner sees it (its attempt cap is the retry policy's for the job's kind)."""
    message = CurrentMessage.get_current_message()
    if message is None:
        raise RuntimeError("actor called outside a worker (CurrentMessage middleware missing)")
    broker = bound_queue().broker
    token = attempt_token_of(message)
    return Delivery(
        message_id=message.message_id,
        retries=int(message.options.get("retries", 0)),
        requeue=lambda: broker.enqueue(message.copy()),
        requeue_later=lambda delay_ms: broker.enqueue(message.copy(), delay=delay_ms),
        **({"token": token} if token else {}),
    )


def _validated(model: type[Payload], payload: dict[str, Any], kind: JobKind | None) -> Payload:
    """Validate a message payload; an invalid one fails its job (when identifiable) and is never retried."""
    queue = bound_queue()
    try:
        return model.model_validate(payload, context=limits_context(queue.options.max_request_bytes))
    except ValidationError as exc:
        reason = describe_validation_error(exc)
        job_id, user_id = salvage_identity(payload)
        if job_id is not None and kind is not None:
            queue.store.record_invalid(job_id=job_id, user_id=user_id, kind=kind, error=reason)
        logger.warning("invalid message rejected: %s", reason, extra={"job_id": job_id, "user_id": user_id})
        raise InvalidPayload(reason) from None


@dramatiq.actor(queue_name="llm_generate", broker=_UNBOUND)
def generate_llm_response(job_id: Any = None, user_id: Any = None, params: Any = None, **unexpected: Any) -> None:
    """Create the job row if missing, stream the answer from the provider, and store it."""
    payload = {"job_id": job_id, "user_id": user_id, "params": params, **unexpected}
    message = _validated(GenerateMessage, payload, JobKind.GENERATE)
    bound_queue().runner.run_generation(message, _delivery())


@dramatiq.actor(queue_name="llm_preview", broker=_UNBOUND)
def generate_preview(
    job_id: Any = None, user_id: Any = None, title: Any = None, content: Any = None, **unexpected: Any
) -> None:
    """Make a tile preview: short content as is, long content summarised by the fast preview model."""
    payload = {"job_id": job_id, "user_id": user_id, "title": title, "content": content, **unexpected}
    message = _validated(PreviewMessage, payload, JobKind.PREVIEW)
    bound_queue().runner.run_preview(message, _delivery())


@dramatiq.actor(queue_name="llm_control", broker=_UNBOUND)
def cancel_llm_job(job_id: Any = None, user_id: Any = None, **unexpected: Any) -> None:
    """Cancel a pending or processing job of this user; finished jobs are left alone."""
    ref = _validated(JobRef, {"job_id": job_id, "user_id": user_id, **unexpected}, None)
    bound_queue().cancel(ref.job_id, ref.user_id)


@dramatiq.actor(queue_name="llm_control", broker=_UNBOUND)
def cleanup_old_jobs(retention_days: Any = None) -> None:
    """Delete finished jobs older than ``JOB_RETENTION_DAYS``; pending and processing jobs are never touched.

    ``retention_days`` overrides the setting; it must be a whole number of at least 1, else the message
    is rejected (never retried) and nothing is deleted.
    """
    if retention_days is not None and (
        isinstance(retention_days, bool) or not isinstance(retention_days, int) or retention_days < 1
    ):
        reason = "invalid payload: retention_days: must be a whole number of days, at least 1"
        logger.warning("invalid message rejected: %s", reason)
        raise InvalidPayload(reason)
    queue = bound_queue()
    days = retention_days if retention_days is not None else queue.options.retention_days
    cutoff = utcnow() - timedelta(days=days)
    deleted = queue.store.delete_finished_before(cutoff)
    logger.info("cleanup deleted %d finished jobs older than %d days", deleted, days)


#: Every actor, in the order they are declared on a queue's broker.
ACTORS: tuple[dramatiq.Actor[..., Any], ...] = (
    generate_llm_response,
    generate_preview,
    cancel_llm_job,
    cleanup_old_jobs,
)
