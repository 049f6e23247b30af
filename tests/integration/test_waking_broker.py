"""WakingRedisBroker: an idle consumer wakes when its own process enqueues a message, on real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest

from brokers.waking_redis import WakingRedisBroker
from tests.conftest import TEST_REDIS_URL, unique
from tests.harness import wait_until

#: A consumer this idle sleeps up to a minute between polls: only a wake-up brings a message sooner.
MINUTE_MS = 60_000


@pytest.fixture
def broker() -> Iterator[WakingRedisBroker]:
    broker = WakingRedisBroker(url=TEST_REDIS_URL, middleware=[])
    yield broker
    close(broker)


def close(broker: WakingRedisBroker) -> None:
    """Close the broker and its Redis connections (Dramatiq's close leaves the pool open)."""
    broker.close()
    broker.client.connection_pool.disconnect()


class Consuming:
    """A thread pulling from one consumer the way Dramatiq's consumer thread does, recording what arrives."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.received: list[tuple[float, dramatiq.Message[Any]]] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            message = next(self.consumer)
            self.polls += 1
            if message is not None:
                self.received.append((time.monotonic(), message))
                self.consumer.ack(message)

    def __enter__(self) -> Consuming:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.consumer.wakeup.set()
        self._thread.join(timeout=5)
        self.consumer.close()


def idle_consumer(broker: WakingRedisBroker, queue: str) -> Any:
    broker.declare_queue(queue)
    consumer: Any = broker.consume(queue, prefetch=4, timeout=MINUTE_MS)
    # as if it had found the queue empty many times: its next sleep is the full idle timeout
    consumer.idle_misses = 30
    return consumer


def test_a_local_enqueue_wakes_the_idle_consumer_at_once(broker: WakingRedisBroker) -> None:
    queue = unique("wake")
    with Consuming(idle_consumer(broker, queue)) as consuming:
        # Given the consumer found the queue empty and went to sleep for up to a minute
        wait_until(lambda: consuming.consumer.idle_misses > 30, what="the consumer's empty poll")
        # When this process enqueues a message on the queue while the consumer sleeps for a minute
        sent = broker.enqueue(dramatiq.Message(queue, "noop", (), {}, {}))
        # Then the consumer fetches it long before its sleep would have ended
        wait_until(lambda: consuming.received, timeout=10, what="the message to be fetched")
        assert consuming.received[0][1].message_id == sent.message_id


def test_a_delayed_enqueue_does_not_wake_the_consumer_of_the_queue(broker: WakingRedisBroker) -> None:
    queue = unique("wake")
    with Consuming(idle_consumer(broker, queue)) as consuming:
        wait_until(lambda: consuming.consumer.idle_misses > 30, what="the consumer's empty poll")
        broker.enqueue(dramatiq.Message(queue, "noop", (), {}, {}), delay=1)
        # the delayed message goes to the delay queue; the sleeping consumer of the queue is left alone
        assert not consuming.consumer.wakeup.is_set()
        assert consuming.polls == 0


def test_another_process_enqueue_is_still_found_by_polling(broker: WakingRedisBroker) -> None:
    queue = unique("wake")
    other = WakingRedisBroker(url=TEST_REDIS_URL, middleware=[])
    try:
        broker.declare_queue(queue)
        with Consuming(broker.consume(queue, prefetch=4, timeout=50)) as consuming:
            sent = other.enqueue(dramatiq.Message(queue, "noop", (), {}, {}))
            wait_until(lambda: consuming.received, timeout=10, what="the message to be fetched by polling")
            assert consuming.received[0][1].message_id == sent.message_id
    finally:
        close(other)
