"""RabbitMQ as the broker (``BROKER_URL``): durable queues, and a reconciler that cannot read them re-sends only
what was never sent."""

from __future__ import annotations

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import pytest

from actors import enqueue_generation
from actors.api import reconciler
from repositories.store import JobKind, JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params

pytestmark = pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True, scope="session")


def _ready_messages(stack: Stack, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(stack.env["BROKER_URL"]))
    try:
        count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        connection.close()


def test_the_job_queues_are_durable(stack: Stack) -> None:
    # Given the queue the generations go to, declared by the worker
    connection = pika.BlockingConnection(pika.URLParameters(stack.env["BROKER_URL"]))
    try:
        # When it is declared again as a non-durable queue
        # Then RabbitMQ refuses: the existing queue is durable (it and its persistent messages survive a restart)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            connection.channel().queue_declare("llm_generate", durable=False)
        assert refused.value.reply_code == 406  # PRECONDITION_FAILED: "inequivalent arg 'durable'"
    finally:
        connection.close()


def test_the_reconciler_resends_a_job_never_sent_but_not_one_waiting_in_rabbitmq(stack: Stack) -> None:
    # Given, with no worker running, one job queued in RabbitMQ and one whose sender died before sending
    with stack.other_workers(0, "none", fresh_queues=True):
        queued = enqueue_generation(user_id="u1", params=params(unique("queued")))
        never_sent = unique("unsent")
        stack.store.create(job_id=never_sent, user_id="u1", kind=JobKind.GENERATE, request=params(never_sent))
        assert _ready_messages(stack, "llm_generate") == 1
        # When the reconciler sweeps (both rows look old enough to check)
        resent = reconciler(pending_after_s=0.0).sweep()
        # Then only the job that never had a message is sent, so the queued one is not duplicated
        assert resent == 1
        assert _ready_messages(stack, "llm_generate") == 2
    # And once a worker runs, both complete
    for job_id in (queued, never_sent):
        assert stack.wait_for_status(job_id, timeout=60).status is JobStatus.COMPLETED
