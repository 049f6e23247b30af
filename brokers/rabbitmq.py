"""RabbitMQ as the message broker: Dramatiq's ``RabbitmqBroker`` with durable queues and publisher confirms.

Dramatiq declares every RabbitMQ queue durable and publishes persistent messages (``delivery_mode=2``),
so queued messages survive a broker restart; ``confirm_delivery=True`` makes every publish wait for
RabbitMQ's confirm, so a send that returns is on the broker's disk (or in its quorum). Consumers are
pushed messages instead of polling. A message stays unacked until its job is done or handed back, and
RabbitMQ redelivers the unacked messages of a consumer whose connection dies (a killed worker), at once.

Everything else this project keeps in Redis stays there: the throttle's slots and parked messages, the
provider lanes, the cancel signals and the live text. What differs from the Redis broker:

- no idle polling and no wake-ups are needed (``WakingRedisBroker``'s job): RabbitMQ pushes;
- the reconciler cannot list queued or unacked messages (RabbitMQ has no way to read a queue without
  consuming it), so it re-sends only jobs whose message was never sent (see ``actors.reconciler``);
- Dramatiq's stock consumer thread is kept: on a lost connection RabbitMQ redelivers every unacked
  message, delayed ones included, so the in-memory delay queue is rightly dropped
  (``consumer_recovery`` solves a Redis-only problem).
"""

from __future__ import annotations

import dramatiq
import pika.exceptions  # type: ignore[import-untyped]
import redis
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from admission.sending import ParkAtSend
from middleware.rabbitmq import RabbitmqTuning
from middleware.worker_tuning import WorkerTuning


class RabbitmqJobBroker(ParkAtSend, RabbitmqBroker):
    """Dramatiq's ``RabbitmqBroker`` plus ``client``: the Redis where this deployment keeps everything that is
    not a message (throttle slots and parked messages, lanes, cancel signals), as on the Redis broker.

    Code that reads messages out of Redis must ask ``is_rabbitmq`` first: on this broker no message is there.
    """

    #: Nothing to wake: RabbitMQ pushes each message to a consumer as it is published.
    wake_idle_consumers = False

    def __init__(self, *, url: str, client: redis.Redis, middleware: list[dramatiq.Middleware]) -> None:
        super().__init__(url=url, confirm_delivery=True, middleware=middleware)
        self.client = client

    def flush(self, queue_name: str) -> None:
        """Dramatiq's ``flush``, on a new connection when the thread's one is found closed.

        A ``BlockingConnection`` answers RabbitMQ's heartbeats only while it is used, so RabbitMQ drops the
        connection of a process that has not used it for a while (a web process, a test session). Dramatiq's
        ``enqueue`` opens a new connection when that happens; its ``flush`` does not, and fails instead.
        """
        try:
            super().flush(queue_name)
        except (pika.exceptions.AMQPConnectionError, pika.exceptions.AMQPChannelError):
            del self.connection
            super().flush(queue_name)


def rabbitmq_broker(
    url: str, client: redis.Redis, middleware: list[dramatiq.Middleware], *, prefetch_per_thread: int = 1
) -> RabbitmqJobBroker:
    """A RabbitMQ broker at ``url`` (``amqp://user:password@host:5672/vhost``) with publisher confirms.

    ``middleware`` is the Redis broker's list: its Redis-only worker tuning (idle polling, Redis consumer
    recovery) is replaced with ``RabbitmqTuning``. ``client`` is the Redis of everything else.
    """
    tuned = [
        RabbitmqTuning(prefetch_per_thread=prefetch_per_thread) if isinstance(item, WorkerTuning) else item
        for item in middleware
    ]
    return RabbitmqJobBroker(url=url, client=client, middleware=tuned)


def is_rabbitmq(broker: dramatiq.Broker) -> bool:
    """True when ``broker`` is a RabbitMQ broker (no Redis keys to read messages from)."""
    return isinstance(broker, RabbitmqBroker)
