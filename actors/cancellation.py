"""Cancelling a job: a compare-and-set in the store, then a Redis pub/sub signal to the worker running it.

The store is the truth: ``cancel`` commits ``status='cancelled'`` before it publishes anything. The
signal only makes the owning worker notice at once; a worker that misses it (Redis blip, listener
reconnecting) still notices at its next heartbeat, whose compare-and-set no longer matches a row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

import redis

from repositories.store import JobStore

logger = logging.getLogger(__name__)

#: One channel for every cancel: a worker process ignores the ids it is not running.
CANCEL_CHANNEL = "llm-jobs:cancel"


class LoopFlag:
    """A flag settable from any thread and awaitable from an event loop (the first ``wait`` attaches it)."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def set(self) -> None:
        """Raise the flag and wake its event loop, if one is attached."""
        with self._lock:
            self._flag.set()
            if self._loop is not None and self._event is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._event.set)

    def is_set(self) -> bool:
        """True once the flag was raised."""
        return self._flag.is_set()

    async def wait(self) -> None:
        """Wait for the flag from inside an event loop."""
        with self._lock:
            if self._event is None:
                self._loop = asyncio.get_running_loop()
                self._event = asyncio.Event()
            if self._flag.is_set():
                self._event.set()
        await self._event.wait()


class CancelWatch(LoopFlag):
    """The stop flag of one running job, settable from any thread and awaitable from the job's loop.

    It is raised by a cancel signal, or by ``hand_back`` when the worker shuts down.
    """

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.handed_back = False

    def hand_back(self) -> None:
        """Stop the job because its worker shuts down: it goes back to the queue, it is not cancelled."""
        self.handed_back = True
        self.set()


class CancelSignals:
    """Publishes cancel signals, and in a worker runs one listener thread that routes them to ``CancelWatch``es."""

    def __init__(self, client: redis.Redis, *, channel: str = CANCEL_CHANNEL, reconnect_delay_s: float = 1.0) -> None:
        self._client = client
        self._channel = channel
        self._reconnect_delay_s = reconnect_delay_s
        self._watches: dict[str, CancelWatch] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._stopping = threading.Event()

    def publish(self, job_id: str) -> None:
        """Tell every worker that ``job_id`` was cancelled; a failure is logged, the heartbeat catches up."""
        try:
            self._client.publish(self._channel, job_id)
        except redis.RedisError as exc:
            logger.warning("cancel signal not published (%s); the worker stops at its next heartbeat", exc)

    def watch(self, watch: CancelWatch) -> None:
        """Route signals for ``watch.job_id`` to it; call before claiming so none slips between claim and stream."""
        self._ensure_listening()
        with self._lock:
            self._watches[watch.job_id] = watch

    def unwatch(self, watch: CancelWatch) -> None:
        """Forget a job that stopped running in this process."""
        with self._lock:
            if self._watches.get(watch.job_id) is watch:
                del self._watches[watch.job_id]

    def wait_until_listening(self, timeout_s: float = 5.0) -> bool:
        """Block until the listener is subscribed (tests and start-up checks)."""
        self._ensure_listening()
        return self._subscribed.wait(timeout_s)

    def close(self) -> None:
        """Stop the listener thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _ensure_listening(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen_forever, name="cancel-listener", daemon=True)
                self._thread.start()

    def _listen_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except redis.RedisError as exc:
                self._subscribed.clear()
                logger.warning("cancel listener lost Redis (%s); reconnecting", exc)
                time.sleep(self._reconnect_delay_s)

    def _listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel)
            while not self._stopping.is_set():
                message = pubsub.get_message(timeout=1.0)
                if not pubsub.subscribed:
                    continue
                self._subscribed.set()
                if message is None or message.get("type") != "message":
                    continue
                data = message["data"]
                job_id = data.decode() if isinstance(data, bytes) else str(data)
                with self._lock:
                    watch = self._watches.get(job_id)
                if watch is not None:
                    watch.set()
        finally:
            pubsub.close()


def cancel(store: JobStore, job_id: str, user_id: str, *, publish: Callable[[str], None] | None = None) -> bool:
    """Cancel the user's pending or processing job and signal the worker running it.

    Returns False when the job is unknown, belongs to another user, or is already finished.
    """
    cancelled = store.cancel(job_id, user_id=user_id)
    if cancelled:
        if publish is not None:
            publish(job_id)
        logger.info("job cancelled", extra={"job_id": job_id, "user_id": user_id})
    return cancelled
