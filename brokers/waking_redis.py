"""The Redis broker of this project: Dramatiq's ``RedisBroker`` whose idle consumers wake on a push."""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import compute_backoff, current_millis
from dramatiq.errors import ConnectionClosed, DecodeError

from admission.sending import ParkAtSend
from middleware.bad_messages import dead_letter_undecodable

logger = logging.getLogger(__name__)


class WakingRedisBroker(ParkAtSend, RedisBroker):
    """A Redis broker whose idle consumers sleep until a message is enqueued for them, by any process.

    Dramatiq's Redis consumer polls: when its queue is empty it sleeps (with backoff, up to the
    worker's timeout) before the next fetch, so an idle worker process sends Redis a fetch per queue
    every few milliseconds at a low cap, and a message waits out the sleep at a high one. Here:

    - every enqueue, delayed ones included, also ``PUBLISH``es the queue's name on ``wake_channel``;
    - each worker process subscribes once (``WakeListener``) and sets the local event of that queue;
    - the consumer sleeps on that event, up to ``idle_poll_ms`` (a fallback poll, for a wake-up lost
      while the subscription reconnects), and never past the next delayed message it holds coming due;
    - an ack or nack wakes it too: a consumer at its prefetch limit fetches again as soon as a slot frees.

    Only ``consumer_class`` (a documented hook of ``RedisBroker``) and ``enqueue`` are overridden; the
    consumer's own fetch, ack and requeue logic is Dramatiq's. A body that cannot be decoded is
    dead-lettered with a reason instead of crashing the consumer (``middleware.bad_messages``).
    """

    #: Off, consumers only poll, as with Dramatiq's own broker (``bench/throttle.py`` measures both).
    wake_idle_consumers = True
    #: The longest an idle consumer sleeps with no wake-up (``WORKER_POLL_INTERVAL_MS``; set by ``WorkerTuning``).
    idle_poll_ms = 1_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._maintain_now = threading.local()
        self._wakeups: dict[str, threading.Event] = {}
        self._wakeups_lock = threading.Lock()
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # Pub/sub channels are shared by every database of a Redis server: one channel per database, so that
        # deployments (or test runs) on other databases of the same server do not wake these consumers.
        db = self.client.connection_pool.connection_kwargs.get("db", 0)
        self.wake_channel = f"{self.namespace}:wake:{db}"
        self._listener: WakeListener | None = None

    def _should_do_maintenance(self, command: str) -> int:
        """Dramatiq's chance per call, or always for the fallback fetch of a consumer that slept undisturbed.

        Maintenance (moving a dead worker's unacked messages back to their queue) runs inside a fetch of
        that same queue. Consumers that polled every 20 ms made one pass of it likely within a fraction of
        a second of the heartbeat timeout; an idle consumer woken by a push fetches once a second, so at a
        1-in-10 chance a killed worker's job waited 10 s more on average (25 s in one measured run).
        """
        if getattr(self._maintain_now, "fetch", False) and command == "fetch":
            return 1
        return super()._should_do_maintenance(command)

    def maintaining(self, enabled: bool) -> None:
        """Make the calling thread's next fetches do maintenance (``enabled``) or take Dramatiq's chance."""
        self._maintain_now.fetch = enabled

    @property
    def consumer_class(self) -> type[_RedisConsumer]:
        """Consumers that sleep on this broker's wake-up events."""
        return _WakingConsumer

    def wakeup_for(self, queue_name: str) -> threading.Event:
        """The event that ends the idle sleep of this process's consumer of ``queue_name``."""
        with self._wakeups_lock:
            return self._wakeups.setdefault(queue_name, threading.Event())

    def wake(self, queue_name: str | None = None) -> None:
        """Set the local event of ``queue_name`` (of every queue: None) if this process consumes it."""
        with self._wakeups_lock:
            events = list(self._wakeups.values()) if queue_name is None else [self._wakeups.get(queue_name)]
        for event in events:
            if event is not None:
                event.set()

    def listen_for_wakeups(self) -> None:
        """Subscribe this process to ``wake_channel`` (once; a consumer calls it when it is built)."""
        if not self.wake_idle_consumers:
            return
        with self._wakeups_lock:
            if self._listener is None:
                self._listener = WakeListener(self.client, self.wake_channel, self.wake)
                self._listener.start()

    def enqueue(self, message: dramatiq.Message[Any], *, delay: int | None = None) -> dramatiq.Message[Any]:
        """Enqueue as Dramatiq does (``do_enqueue`` also pushes the wake-up), then wake this process's consumer."""
        enqueued: dramatiq.Message[Any] = super().enqueue(message, delay=delay)
        if self.wake_idle_consumers:
            self.wake(enqueued.queue_name)
        return enqueued

    def do_enqueue(self, queue_name: str, redis_message_id: str, data: bytes) -> None:
        """Dramatiq's enqueue script and the wake-up ``PUBLISH`` of ``queue_name`` in one round trip.

        ``RedisBroker.enqueue`` calls ``do_enqueue``, which Dramatiq resolves to its dispatch script; defined
        here, it runs that same script (same arguments as ``RedisBroker._dispatch``) in a pipeline with the
        wake-up. A script not loaded in Redis yet (a fresh or restarted server) is run the way Dramatiq runs it.
        """
        if not self.wake_idle_consumers:
            self._dispatch("enqueue")(queue_name, redis_message_id, data)  # type: ignore[no-untyped-call]
            return
        script = self.scripts["dispatch"]
        args = self._dispatch_args("enqueue", queue_name, redis_message_id, data)
        pipe = self.client.pipeline(transaction=False)
        pipe.evalsha(script.sha, 1, self.namespace, *args)
        pipe.publish(self.wake_channel, queue_name)
        enqueued, published = pipe.execute(raise_on_error=False)
        if isinstance(enqueued, redis.exceptions.NoScriptError):
            script(keys=[self.namespace], args=args)
            published = self._publish_wakeup(queue_name)
        elif isinstance(enqueued, Exception):
            raise enqueued
        if isinstance(published, Exception):
            # The message is enqueued; consumers elsewhere find it at their next fallback poll.
            logger.debug("could not publish the wake-up of %s (%s)", queue_name, type(published).__name__)

    def _dispatch_args(self, command: str, queue_name: str, *args: Any) -> list[Any]:
        """The arguments of Dramatiq's dispatch script for ``command``, as ``RedisBroker._dispatch`` builds them."""
        return [
            command,
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            self._should_do_maintenance(command),
            self._max_unpack_size(),  # type: ignore[no-untyped-call]
            *args,
        ]

    def _publish_wakeup(self, queue_name: str) -> object:
        try:
            return self.client.publish(self.wake_channel, queue_name)
        except redis.RedisError as exc:
            return exc

    def close(self) -> None:
        """Stop the wake-up subscription, then close as Dramatiq does."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None
        super().close()


class WakeListener:
    """One pub/sub subscription per process: each queue name published on ``channel`` wakes that queue's consumer.

    Every confirmed subscription (the first, and each after a lost connection) wakes every consumer once: a
    message enqueued before it was confirmed published its wake-up to nobody here, and Redis does not replay.
    A lost subscription is retried a second later. ``stop`` publishes on a channel of this listener's own,
    so that it returns at once instead of at the next one-second read timeout.
    """

    def __init__(self, client: redis.Redis, channel: str, wake: Callable[[str | None], None]) -> None:
        self._client = client
        self._channel = channel
        self._stop_channel = f"{channel}:stop:{uuid.uuid4().hex}"
        self._wake = wake
        self._stopping = threading.Event()
        #: Set once the first subscription is confirmed (and every consumer woken for it).
        self.subscribed = threading.Event()
        self._thread = threading.Thread(target=self._listen_forever, name="wake-listener", daemon=True)

    def start(self) -> None:
        """Start the listening thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop it: at once when Redis answers, else within a second."""
        self._stopping.set()
        with contextlib.suppress(redis.RedisError):
            self._client.publish(self._stop_channel, b"")
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _listen_forever(self) -> None:
        lost = False
        while not self._stopping.is_set():
            try:
                self._listen(after_loss=lost)
            except redis.RedisError as exc:
                if not lost:
                    logger.warning("wake-up subscription lost Redis (%s); consumers poll until it is back", exc)
                lost = True
                self._stopping.wait(1.0)

    def _listen(self, *, after_loss: bool) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel, self._stop_channel)
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                channel = message.get("channel")
                if isinstance(channel, bytes):
                    channel = channel.decode()
                if channel != self._channel:
                    continue  # the stop channel: the loop condition decides
                if message.get("type") == "subscribe":
                    if after_loss:
                        logger.info("wake-up subscription is back")
                    after_loss = False
                    self._wake(None)
                    self.subscribed.set()
                elif message.get("type") == "message":
                    data = message["data"]
                    self._wake(data.decode() if isinstance(data, bytes) else str(data))
        finally:
            pubsub.close()


class _WakingConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer with its idle sleep moved onto an event that any enqueue of its queue sets.

    ``timeout`` (Dramatiq's worker timeout) is not its idle cap: that is the broker's ``idle_poll_ms``.
    ``next_due_ms`` (set by ``ResilientConsumerThread``) gives the eta of the earliest delayed message the
    consumer thread holds, so that the sleep ends when it comes due.
    """

    def __init__(self, broker: WakingRedisBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        # Dramatiq's own idle sleep is switched off (a zero cap backs off 0 ms); this class sleeps instead.
        super().__init__(broker, queue_name, prefetch, 0)  # type: ignore[no-untyped-call]
        self.idle_timeout_ms = broker.idle_poll_ms
        self.idle_misses = 0
        self.wakeup = broker.wakeup_for(queue_name)
        self.next_due_ms: Callable[[], int | None] = lambda: None
        self.interrupted = False
        #: The last idle sleep ran its full length (no enqueue or ack woke it).
        self.slept_undisturbed = False
        broker.listen_for_wakeups()

    def interrupt(self) -> None:
        """End the idle sleep now and skip the next ones (the consumer thread is stopping)."""
        self.interrupted = True
        self.wakeup.set()

    def __next__(self) -> Any:
        # Cleared before the fetch: a message enqueued after this point either is fetched now or sets the
        # event again, so the wait below returns at once; no wake-up is lost.
        self.wakeup.clear()
        self.broker.maintaining(self.slept_undisturbed)
        self.slept_undisturbed = False
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
        if self.broker.wake_idle_consumers:
            # Woken by every enqueue of the queue and every ack: no need to poll sooner than the fallback.
            self.idle_misses, backoff_ms = self.idle_misses + 1, self.idle_timeout_ms
        else:
            self.idle_misses, backoff_ms = compute_backoff(self.idle_misses, max_backoff=self.idle_timeout_ms)
        if self.interrupted:
            return None  # set after the clear above would be lost otherwise: the thread is stopping, do not sleep
        due = self.next_due_ms()
        if due is not None:
            backoff_ms = max(0, min(backoff_ms, due - current_millis()))
        # Nothing woke it: the next fetch is a fallback poll, the one that looks for a dead worker's messages.
        self.slept_undisturbed = not self.wakeup.wait(backoff_ms / 1000)
        return None

    # With socket timeouts set, a silent Redis raises redis.TimeoutError, which Dramatiq's consumer does not
    # treat as a lost connection (only redis.ConnectionError): report it as one, so that acks are retried
    # and the consumer reconnects, instead of "unhandled error" paths that leave messages unacked.

    # An ack or nack frees a prefetch place: wake the consumer, which may have stopped fetching at its limit.

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        except redis.TimeoutError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        finally:
            self.wakeup.set()

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        except redis.TimeoutError as exc:
            raise ConnectionClosed(exc) from None  # type: ignore[no-untyped-call]
        finally:
            self.wakeup.set()
