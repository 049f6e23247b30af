"""The Redis broker of this project: Dramatiq's ``RedisBroker`` whose idle consumers wake on local enqueues."""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed, DecodeError

from admission.sending import ParkAtSend
from middleware.bad_messages import dead_letter_undecodable

logger = logging.getLogger(__name__)


class WakingRedisBroker(ParkAtSend, RedisBroker):
    """A Redis broker whose idle consumers wake as soon as their own process enqueues a message for them.

    Dramatiq's Redis consumer polls: when its queue is empty it sleeps (with backoff, up to the
    worker's timeout) before the next fetch. A throttle slot freed by a finishing job is handed to the
    next parked message by enqueueing it from the worker thread that just became free; with plain
    polling that message waits out the consumer's sleep (15 ms on average at a 20 ms cap, once per
    handoff). Here the consumer sleeps on an event that a local enqueue sets, so it fetches at once.
    Messages enqueued by other processes are still found by polling.

    Only ``consumer_class`` (a documented hook of ``RedisBroker``) and ``enqueue`` are overridden; the
    consumer's own fetch, ack and requeue logic is Dramatiq's. A body that cannot be decoded is
    dead-lettered with a reason instead of crashing the consumer (``middleware.bad_messages``).
    """

    #: Off, consumers only poll, as with Dramatiq's own broker (``bench/throttle.py`` measures both).
    wake_idle_consumers = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._wakeups: dict[str, threading.Event] = {}
        self._wakeups_lock = threading.Lock()
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        """Consumers that sleep on this broker's wake-up events."""
        return _WakingConsumer

    def wakeup_for(self, queue_name: str) -> threading.Event:
        """The event that ends the idle sleep of this process's consumer of ``queue_name``."""
        with self._wakeups_lock:
            return self._wakeups.setdefault(queue_name, threading.Event())

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """Enqueue as Dramatiq does, then wake this process's consumer of the queue (if it has one)."""
        enqueued: dramatiq.Message[Any] = super().enqueue(message, delay=delay)
        if delay is None and self.wake_idle_consumers:
            wakeup = self._wakeups.get(enqueued.queue_name)
            if wakeup is not None:
                wakeup.set()
        return enqueued


class _WakingConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer with its idle sleep moved onto an event that a local enqueue sets."""

    def __init__(self, broker: WakingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        # Dramatiq's own idle sleep is switched off (a zero cap backs off 0 ms); this class sleeps instead.
        super().__init__(broker, queue_name, prefetch, 0)  # type: ignore[no-untyped-call]
        self.idle_timeout_ms = timeout
        self.idle_misses = 0
        self.wakeup = broker.wakeup_for(queue_name)

    def __next__(self) -> Any:
        # Cleared before the fetch: a message enqueued after this point either is fetched now or sets the
        # event again, so the wait below returns at once; no wake-up is lost.
        self.wakeup.clear()
        while True:
            try:
                message = super().__next__()  # type: ignore[no-untyped-call]
                break
            except DecodeError as error:
                # Dramatiq's consumer would crash here and strand the rest of its batch; the cache keeps the rest.
                dead_letter_undecodable(self.broker, self.queue_name, error)
            except redis.TimeoutError as exc:
                raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        if message is not None:
            self.idle_misses = 0
            return message
        self.idle_misses, backoff_ms = compute_backoff(self.idle_misses, max_backoff=self.idle_timeout_ms)
        self.wakeup.wait(backoff_ms / 1000)
        return None

    # With socket timeouts set, a silent Redis raises redis.TimeoutError, which Dramatiq's consumer does not
    # treat as a lost connection (only redis.ConnectionError): report it as one, so that acks are retried
    # and the consumer reconnects, instead of "unhandled error" paths that leave messages unacked.

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        except redis.TimeoutError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        except redis.TimeoutError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
