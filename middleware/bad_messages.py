"""Messages that cannot run: undecodable bodies, calls the actor cannot accept, and secrets in stored tracebacks.

- ``dead_letter_undecodable``: a body that is not a Dramatiq message (not JSON, missing fields) makes
  Dramatiq's Redis consumer crash and restart, and the messages fetched with it stay unacked in a live
  worker, so they never run. The consumer of ``WakingRedisBroker`` hands such a body here instead: it
  is moved to the queue's dead letters with a reason, never logged, and the rest of the batch runs.
- ``MalformedMessages``: a decodable message whose arguments the actor cannot take (too many
  positional arguments, ``kwargs`` that is not an object) would fail with ``TypeError`` and be retried
  as if it were transient. It is dead-lettered at once instead, without a retry.
- ``RedactTracebacks``: Dramatiq's ``Retries`` keeps the last traceback in the message options, which
  live in Redis; it is masked (``repositories.redaction``) before the message is enqueued.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.errors import DecodeError
from dramatiq.middleware import SkipMessage

from repositories.redaction import redact

logger = logging.getLogger(__name__)

#: Hash of (redis message id -> reason) beside a queue's dead letters, e.g. ``dramatiq:llm_generate.XQ.reasons``.
REASONS_SUFFIX = ".XQ.reasons"


def undecodable_reason(error: DecodeError) -> str:
    """Why a body is not a message, in words that never quote the body."""
    cause = error.error
    while isinstance(cause, DecodeError):  # Dramatiq's encoder wraps its own DecodeError in another
        cause = cause.error
    if isinstance(cause, UnicodeDecodeError):
        return "body is not UTF-8 text"
    if isinstance(cause, json.JSONDecodeError):
        return "body is not JSON"
    return f"body is not a Dramatiq message ({type(cause).__name__}: missing, extra or ill-typed fields)"


def dead_letter_undecodable(broker: Any, queue_name: str, error: DecodeError) -> str | None:
    """Move the undecodable body of ``error``, fetched by this process from ``queue_name``, to the dead letters.

    Returns the body's Redis message id (None when it could not be found or Redis failed: the body then
    stays unacked and comes back after this worker stops, to be dead-lettered by the next one).
    """
    reason = undecodable_reason(error)
    canonical = queue_name.removesuffix(".DQ")
    client = broker.client
    try:
        acks = f"{broker.namespace}:__acks__.{broker.broker_id}.{queue_name}"
        ids = list(client.smembers(acks))
        bodies = client.hmget(f"{broker.namespace}:{queue_name}.msgs", ids) if ids else []
        redis_id = next((i for i, body in zip(ids, bodies, strict=True) if body == error.data), None)
        if redis_id is None:
            logger.error("undecodable message on %s (%s) not found among this worker's messages", queue_name, reason)
            return None
        message_id: str = redis_id.decode()
        broker.do_nack(queue_name, message_id)
        reasons = f"{broker.namespace}:{canonical}{REASONS_SUFFIX}"
        client.hset(reasons, message_id, reason)
        client.pexpire(reasons, broker.dead_message_ttl)
    except redis.RedisError as exc:
        logger.error("undecodable message on %s (%s) could not be dead-lettered: %s", queue_name, reason, exc)
        return None
    logger.error("undecodable message dead-lettered from %s: %s (redis id %s)", queue_name, reason, message_id)
    return message_id


class MalformedMessages(dramatiq.Middleware):
    """Dead-letter, without a retry, a message its actor cannot be called with.

    Must come first: every later middleware may read ``message.kwargs``.

    Parameters:
      on_rejected: called with the message and the reason before it is dead-lettered (the wiring fails
        the job in the store when the message names one).
    """

    def __init__(self, *, on_rejected: Callable[[Any, str], None] | None = None) -> None:
        self.on_rejected = on_rejected
        self._signatures: dict[str, inspect.Signature] = {}

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Check the call shape against the actor's signature; dead-letter the message if it cannot bind."""
        reason = self.problem(broker, message)
        if reason is None:
            return
        logger.warning("malformed message dead-lettered: %s", reason, extra={"message_id": message.message_id})
        if self.on_rejected is not None:
            try:
                self.on_rejected(message, reason)
            except Exception as exc:  # the store may be down: the message is dead-lettered all the same
                logger.warning("could not record the malformed message's job as failed: %s", type(exc).__name__)
        message.fail()
        raise SkipMessage(f"malformed message: {reason}")

    def problem(self, broker: dramatiq.Broker, message: Any) -> str | None:
        """What makes the message impossible to call its actor with, or None."""
        if not isinstance(message.kwargs, dict):
            return f"kwargs must be an object, not {type(message.kwargs).__name__}"
        if not isinstance(message.args, list | tuple):
            return f"args must be a list, not {type(message.args).__name__}"
        try:
            actor = broker.get_actor(message.actor_name)
        except dramatiq.errors.ActorNotFound:
            return None  # Dramatiq dead-letters it itself
        signature = self._signatures.get(message.actor_name)
        if signature is None:
            signature = self._signatures[message.actor_name] = inspect.signature(actor.fn)
        if not all(isinstance(name, str) for name in message.kwargs):
            return "kwargs names must be strings"
        try:
            signature.bind(*message.args, **message.kwargs)
        except TypeError as exc:
            return f"arguments do not fit {message.actor_name}: {exc}"
        return None


class RedactTracebacks(dramatiq.Middleware):
    """Mask secrets in the traceback Dramatiq stores in a message's options before the message reaches Redis."""

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        """Rewrite ``options["traceback"]`` in place (the broker encodes this very message next)."""
        stored = message.options.get("traceback")
        if isinstance(stored, str):
            message.options["traceback"] = redact(stored)
