"""WakingRedisBroker: an idle consumer wakes when its own process enqueues a message, on real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis

from brokers.waking_redis import WakeListener, WakingRedisBroker
from tests.conftest import TEST_REDIS_URL, unique
from tests.faults.own_redis import OwnRedis
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
    # (its subscription confirmed: that wakes every consumer once, which a test of one wake-up must not see)
    assert broker._listener is not None
    assert broker._listener.subscribed.wait(10)
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


def test_an_enqueue_by_another_process_wakes_the_idle_consumer_at_once(broker: WakingRedisBroker) -> None:
    queue = unique("wake")
    other = WakingRedisBroker(url=TEST_REDIS_URL, middleware=[])
    broker.idle_poll_ms = MINUTE_MS  # only a push can bring the message within the test's deadline
    try:
        with Consuming(idle_consumer(broker, queue)) as consuming:
            # Given the consumer subscribed to wake-ups, found the queue empty and went to sleep for a minute
            assert broker._listener is not None
            wait_until(lambda: consuming.consumer.idle_misses > 30, what="the consumer's empty poll")
            wait_until(
                lambda: broker.client.pubsub_numsub(broker.wake_channel)[0][1] >= 1,
                what="the wake-up subscription",
            )
            # When another broker (another process's) enqueues a message on the queue
            sent = other.enqueue(dramatiq.Message(queue, "noop", (), {}, {}))
            # Then the sleeping consumer fetches it long before its sleep would have ended
            wait_until(lambda: consuming.received, timeout=10, what="the message to be fetched")
            assert consuming.received[0][1].message_id == sent.message_id
    finally:
        close(other)


def test_an_idle_consumer_sends_nothing_between_fallback_polls(broker: WakingRedisBroker) -> None:
    queue = unique("wake")
    broker.idle_poll_ms = MINUTE_MS
    with Consuming(idle_consumer(broker, queue)) as consuming:
        # Given the consumer found its queue empty once (each empty fetch counts one miss)
        misses = wait_until(
            lambda: consuming.consumer.idle_misses > 30 and consuming.consumer.idle_misses, what="a miss"
        )
        # When nothing is enqueued for a while (a wait on a condition that must stay false)
        with pytest.raises(AssertionError):
            wait_until(lambda: consuming.consumer.idle_misses > misses, timeout=1.0, what="another fetch")
        # Then it did not fetch again: it sleeps until a wake-up or its fallback poll
        assert consuming.consumer.idle_misses == misses
        assert consuming.polls == 0


def test_a_delayed_message_moves_to_its_queue_when_due_not_at_the_fallback_poll(broker: WakingRedisBroker) -> None:
    from queue import PriorityQueue

    from dramatiq.common import dq_name

    from middleware.consumer_recovery import ResilientConsumerThread

    queue = unique("wake")
    broker.idle_poll_ms = MINUTE_MS  # the delay queue's consumer would otherwise sleep a minute between fetches
    broker.declare_queue(queue)
    thread = ResilientConsumerThread(
        broker=broker, queue_name=dq_name(queue), prefetch=10, work_queue=PriorityQueue(), worker_timeout=1000
    )
    thread.start()
    try:
        # Given the delay queue's consumer holding nothing and asleep
        wait_until(lambda: getattr(thread.consumer, "idle_misses", 0) >= 1, what="the consumer's empty poll")
        # When a message is enqueued with a 300 ms delay
        broker.enqueue(dramatiq.Message(queue, "noop", (), {}, {}), delay=300)
        # Then it reaches its queue once due, long before the consumer's next fallback poll
        wait_until(lambda: broker.client.llen(f"{broker.namespace}:{queue}") == 1, timeout=10, what="the due message")
    finally:
        thread.stop()
        thread.join(timeout=5)
        thread.close()


def test_a_confirmed_subscription_wakes_every_consumer_once() -> None:
    # A message enqueued by another process before this one's subscription is confirmed published its
    # wake-up to nobody here; the confirmation stands for it.
    woken: list[str | None] = []
    client = redis.Redis.from_url(TEST_REDIS_URL)
    listener = WakeListener(client, unique("wake-channel"), woken.append)
    try:
        # When the listener subscribes
        listener.start()
        # Then, once Redis confirms, every consumer of the process is woken (None: all queues)
        wait_until(lambda: woken, what="the wake-up of the confirmed subscription")
        assert woken == [None]
        assert listener.subscribed.is_set()
    finally:
        listener.stop()
        client.close()


def test_wake_ups_are_published_per_redis_database() -> None:
    # Pub/sub is shared by the databases of a server: another deployment's enqueues must not wake these consumers
    brokers = [WakingRedisBroker(url=f"{TEST_REDIS_URL.rsplit('/', 1)[0]}/{db}", middleware=[]) for db in (4, 5)]
    try:
        assert brokers[0].wake_channel.endswith(":wake:4")
        assert brokers[1].wake_channel.endswith(":wake:5")
    finally:
        for each in brokers:
            close(each)


def test_a_worker_whose_threads_and_consumers_sleep_long_stops_at_once(broker: WakingRedisBroker) -> None:
    from middleware.worker_tuning import WorkerTuning

    # Given a worker whose idle threads look at the work queue once a minute, and whose consumer sleeps a minute
    broker.add_middleware(WorkerTuning(poll_interval_ms=MINUTE_MS))
    queue = unique("stop")

    @dramatiq.actor(broker=broker, queue_name=queue)
    def noop() -> None:
        pass

    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=MINUTE_MS)
    worker.start()
    stopping = threading.Thread(target=worker.stop, daemon=True)
    try:
        consumer = worker.consumers[queue].consumer
        wait_until(lambda: getattr(worker.consumers[queue].consumer, "idle_misses", 0) >= 1, what="an idle consumer")
        assert consumer is not None
        # When it is stopped
        stopping.start()
        # Then it stops long before a minute: idle threads and the sleeping consumer are woken
        stopping.join(timeout=20)
        assert not stopping.is_alive()
        assert not any(thread.is_alive() for thread in worker.workers)
    finally:
        if stopping.is_alive():
            stopping.join(timeout=90)


def test_an_idle_consumers_fallback_fetch_moves_a_dead_workers_messages_back() -> None:
    # Given a worker that fetched a message and died without acking it (its broker heartbeat goes stale in 1 s)
    queue = unique("dead")
    dead = WakingRedisBroker(url=TEST_REDIS_URL, middleware=[], heartbeat_timeout=1_000)
    dead.declare_queue(queue)
    sent = dead.enqueue(dramatiq.Message(queue, "noop", (), {}, {}))
    dead_consumer: Any = dead.consume(queue, prefetch=1, timeout=MINUTE_MS)
    fetched = wait_until(lambda: next(dead_consumer), timeout=10, what="the dead worker's fetch")
    assert fetched.message_id == sent.message_id
    close(dead)
    # And a live worker whose broker never takes Dramatiq's chance of maintenance, with a 200 ms fallback poll
    live = WakingRedisBroker(url=TEST_REDIS_URL, middleware=[], heartbeat_timeout=1_000, maintenance_chance=0)
    live.idle_poll_ms = 200
    try:
        live.declare_queue(queue)
        with Consuming(live.consume(queue, prefetch=4, timeout=MINUTE_MS)) as consuming:
            # When its idle consumer sleeps undisturbed past the dead worker's heartbeat timeout
            # Then a fallback fetch moves the dead worker's message back, and the live worker gets it
            wait_until(lambda: consuming.received, timeout=10, what="the dead worker's message to come back")
            assert consuming.received[0][1].message_id == sent.message_id
    finally:
        close(live)


def test_an_enqueue_after_redis_lost_its_scripts_still_enqueues_and_wakes_the_consumer() -> None:
    # Given a broker on a Redis of the test's own, whose scripts were flushed since the broker last used them
    with OwnRedis() as server:
        broker = WakingRedisBroker(url=server.url, middleware=[])
        other = WakingRedisBroker(url=server.url, middleware=[])
        try:
            queue = unique("noscript")
            broker.idle_poll_ms = MINUTE_MS
            other.enqueue(dramatiq.Message(queue, "noop", (), {}, {}))  # the enqueue script is loaded now
            assert other.client.script_flush()
            with Consuming(idle_consumer(broker, queue)) as consuming:
                wait_until(lambda: len(consuming.received) == 1, timeout=10, what="the first message")
                # (an empty fetch after it: the consumer now sleeps up to a minute)
                wait_until(lambda: consuming.consumer.idle_misses >= 1, what="the consumer's empty poll")
                # When another process enqueues (its pipelined script call finds no script in Redis)
                sent = other.enqueue(dramatiq.Message(queue, "noop", (), {}, {}))
                # Then the message is enqueued anyway, and the sleeping consumer is woken for it
                wait_until(lambda: len(consuming.received) == 2, timeout=10, what="the second message")
                assert consuming.received[1][1].message_id == sent.message_id
        finally:
            close(other)
            close(broker)
