"""RabbitMQ as the broker (``BROKER_URL``): durable queues, and a reconciler that cannot read them re-sends only
what was never sent."""

from __future__ import annotations

import contextlib

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import pytest
import redis

from actors import enqueue_generation
from actors.api import reconciler
from brokers.rabbitmq import RabbitmqJobBroker
from repositories.store import JobKind, JobStatus
from tests.conftest import TEST_REDIS_URL, unique
from tests.harness import wait_until
from tests.integration.conftest import Stack, params
from tests.integration.rabbitmq import own_vhost, rabbitmqctl

on_rabbitmq = pytest.mark.parametrize("stack", ["rabbitmq-postgresql"], indirect=True, scope="session")


def _ready_messages(stack: Stack, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(stack.env["BROKER_URL"]))
    try:
        count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        connection.close()


@on_rabbitmq
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


@on_rabbitmq
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


def _connection_closed(connection: pika.BlockingConnection) -> bool:
    with contextlib.suppress(pika.exceptions.AMQPError):
        connection.process_data_events(time_limit=0.05)
    return bool(connection.is_closed)


def test_a_flush_after_rabbitmq_dropped_the_connection_opens_a_new_one() -> None:
    # Given a broker on a virtual host of its own whose connection has been used once, and a queued message
    with own_vhost() as url:
        broker = RabbitmqJobBroker(url=url, client=redis.Redis.from_url(TEST_REDIS_URL), middleware=[])
        try:
            broker.declare_queue("flushed")  # known to flush_all; declared on RabbitMQ at the first send
            broker.channel.queue_declare("flushed", durable=True)
            broker.flush_all()
            broker.channel.basic_publish(exchange="", routing_key="flushed", body=b"left over")
            # When RabbitMQ drops that connection, as it does when a process misses its heartbeats while idle
            assert rabbitmqctl("close_all_connections", "-p", url.rsplit("/", 1)[-1], "idle too long")
            wait_until(lambda: _connection_closed(broker.connection), timeout=30, what="the connection to close")
            # Then a flush still empties the queue, on a new connection
            broker.flush_all()
            assert broker.connection.is_open
            depth = broker.channel.queue_declare("flushed", durable=True, passive=True).method.message_count
            assert depth == 0
        finally:
            broker.close()
            broker.client.close()
