"""Keep a worker's delayed messages through a Redis reconnect (Dramatiq drops them).

Dramatiq's ``ConsumerThread`` holds the messages it fetched from a delay queue (retries waiting for
their backoff, throttled starts) in memory until their eta. On a connection error it replaces that
queue with an empty one (``self.delay_queue = PriorityQueue()`` in ``ConsumerThread.run``), so the
messages are gone from the process, while Redis still lists them as unacked by a live worker: the
broker's maintenance never requeues them, and their jobs wait until the worker process restarts.
An error while a due message is moved to its queue also loses that message, and one raised while the
queue is requeued on close ends the consumer thread for good.

``ResilientConsumerThread`` is Dramatiq's thread with those paths changed: the delay queue is kept
across reconnects, and so is the consumer with the messages it prefetched (delayed messages move to
their queues when due, once Redis answers, and their acks clear whatever Redis still remembers); a
due message that cannot be moved yet stays in the delay queue; a Redis error never ends the thread.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from dramatiq.common import current_millis, iter_queue, q_name
from dramatiq.errors import BrokerConnectionError
from dramatiq.worker import CONSUMER_RESTART_DELAY_SECS, ConsumerThread

logger = logging.getLogger(__name__)

#: What a lost or restarting Redis raises, wrapped by Dramatiq or not.
CONNECTION_ERRORS = (BrokerConnectionError, redis.ConnectionError, redis.TimeoutError)


class ResilientConsumerThread(ConsumerThread):
    """Dramatiq's consumer thread, keeping its delayed messages through Redis reconnects."""

    def run(self) -> None:
        """Consume until stopped; on a connection error, reconnect a second later with the delay queue intact."""
        self.running = True
        self.broker.emit_after("consumer_thread_boot", self)
        while self.running:
            if self.paused:
                self.paused_event.set()
                time.sleep(self.worker_timeout / 1000)
                continue
            try:
                if self.consumer is None:
                    self.consumer = self.broker.consume(
                        queue_name=self.queue_name, prefetch=self.prefetch, timeout=self.worker_timeout
                    )
                    if hasattr(self.consumer, "next_due_ms"):
                        # A consumer that sleeps until woken (``WakingRedisBroker``) ends its sleep when the
                        # earliest delayed message held here comes due.
                        self.consumer.next_due_ms = self.next_due_ms
                for message in self.consumer:
                    if message is not None:
                        self.handle_message(message)
                    elif self.paused:
                        break
                    self.handle_delayed_messages()
                    if not self.running:
                        break
            except CONNECTION_ERRORS as error:
                logger.error(
                    "consumer of %s lost Redis (%s); reconnecting, %d delayed messages kept",
                    self.queue_name,
                    type(error).__name__,
                    self.delay_queue.qsize(),
                )
            except Exception:
                logger.critical("consumer of %s failed unexpectedly; restarting it", self.queue_name, exc_info=True)
                self.close()
                self.consumer = None
            if self.running:
                time.sleep(CONSUMER_RESTART_DELAY_SECS)
        self.broker.emit_before("consumer_thread_shutdown", self)

    def next_due_ms(self) -> int | None:
        """The eta (epoch ms) of the earliest delayed message held, or None."""
        with self.delay_queue.mutex:
            return self.delay_queue.queue[0].priority if self.delay_queue.queue else None

    def stop(self) -> None:
        """Stop as Dramatiq does, and end an idle consumer's sleep so that it stops now."""
        super().stop()
        interrupt = getattr(self.consumer, "interrupt", None)
        if interrupt is not None:
            interrupt()

    def handle_delayed_messages(self) -> None:
        """Move every delayed message whose eta has passed to its queue; one that cannot be moved yet stays."""
        for item in iter_queue(self.delay_queue):  # type: ignore[no-untyped-call]
            message = item.message
            if item.priority > current_millis():
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                break
            due = message.copy(queue_name=q_name(message.queue_name))
            del due.options["eta"]
            try:
                self.broker.enqueue(due)
            except BaseException:
                self.delay_queue.put(item)
                self.delay_queue.task_done()
                raise
            self.post_process_message(message)
            self.delay_queue.task_done()

    def close(self) -> None:
        """Hand the delayed messages back to Redis and close the consumer; keep them if Redis is unreachable."""
        if self.consumer is None:
            return
        items = list(iter_queue(self.delay_queue))  # type: ignore[no-untyped-call]
        try:
            self.requeue_messages(item.message for item in items)
        except CONNECTION_ERRORS:
            for item in items:
                self.delay_queue.put(item)
        else:
            self.consumer.close()
        for _ in items:
            self.delay_queue.task_done()


def use_resilient_consumers(worker: Any) -> None:
    """Make ``worker`` (a ``dramatiq.Worker`` not started yet) build ``ResilientConsumerThread``s for its queues.

    Dramatiq builds its consumer threads in ``Worker._add_consumer`` with no hook to choose the class;
    this replaces that one method on the instance, with the same body and the class above.
    """
    from dramatiq.common import q_name as canonical

    def add_consumer(queue_name: str, *, delay: bool = False) -> None:
        if queue_name in worker.consumers:
            return
        if worker.consumer_whitelist and canonical(queue_name) not in worker.consumer_whitelist:
            return
        consumer = worker.consumers[queue_name] = ResilientConsumerThread(
            broker=worker.broker,
            queue_name=queue_name,
            prefetch=worker.delay_prefetch if delay else worker.queue_prefetch,
            work_queue=worker.work_queue,
            worker_timeout=worker.worker_timeout,
        )
        consumer.start()

    worker._add_consumer = add_consumer
