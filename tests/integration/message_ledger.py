"""How many messages of each job are still alive, for tests on RabbitMQ (whose unacked messages cannot be read).

On the Redis broker a test reads Dramatiq's message hashes to learn that a job's messages are all
handled. RabbitMQ offers no such read over AMQP (a queue's count leaves out unacked messages), so here
every process counts instead: ``MessageLedger`` adds one per message enqueued (after the publish is
confirmed) and takes one off per message acked or dead-lettered, per job, in a Redis hash. A job whose
count is back to zero has no message queued, delayed, prefetched or running anywhere.

The worker side is ``dramatiq tests.integration.ledger_actors``: the real actors with the ledger added.
The test process adds it to its own broker (``tests.integration.rabbitmq``).
"""

from __future__ import annotations

from typing import Any

import dramatiq
import redis

from tests.harness import wait_until

LEDGER_KEY = "test:message-ledger"


def job_of(message: Any) -> str | None:
    """The ``job_id`` a message carries (keyword or first positional argument)."""
    job_id = message.kwargs.get("job_id") if isinstance(message.kwargs, dict) else None
    if job_id is None and isinstance(message.args, list | tuple) and message.args:
        job_id = message.args[0]
    return job_id if isinstance(job_id, str) else None


class MessageLedger(dramatiq.Middleware):
    """Counts the live messages of each job in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _count(self, message: Any, change: int) -> None:
        job_id = job_of(message)
        if job_id is not None:
            self.client.hincrby(LEDGER_KEY, job_id, change)

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        """A message was published."""
        self._count(message, 1)

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        """A message was done with (run, skipped, or moved out of the delay queue)."""
        self._count(message, -1)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        """A message was dead-lettered: done with too."""
        self._count(message, -1)


def wait_until_no_ledgered_message_for(client: redis.Redis, job_id: str, *, timeout: float = 20.0) -> None:
    """Wait until every message of ``job_id`` enqueued so far was acked or dead-lettered."""
    wait_until(
        lambda: int(client.hget(LEDGER_KEY, job_id) or 0) <= 0,
        timeout=timeout,
        interval=0.05,
        what=f"the messages of {job_id} to be handled",
    )
