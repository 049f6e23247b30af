"""Size the worker's prefetch and idle polling for long jobs, and wake idle consumers on local enqueues."""

from __future__ import annotations

import gc
import logging
import queue
import time
from typing import Any

import dramatiq

from middleware.consumer_recovery import use_resilient_consumers

logger = logging.getLogger(__name__)


class WorkerTuning(dramatiq.Middleware):
    """Set how many messages a worker process holds per queue, how long an idle consumer sleeps, and make
    its consumer threads keep their delayed messages through Redis reconnects (``consumer_recovery``).

    Dramatiq prefetches twice the thread count by default, which suits short tasks. LLM jobs run for
    minutes, so a message prefetched by a busy process waits there while another process idles.
    The consumers of ``WakingRedisBroker`` sleep until an enqueue of their queue, by any process, wakes
    them; ``poll_interval_ms`` caps that sleep (a fallback for a lost wake-up). With another broker it
    is Dramatiq's worker timeout, which caps its consumers' idle backoff.

    Once a worker process has booted (``dramatiq``'s processes; not a ``Worker`` built in some other
    process, such as a test's), it also tunes Python's cyclic garbage collector for a process that holds
    hundreds of running jobs. A full collection walks every tracked object with the GIL held: at 1,000
    streams that took 200 to 500 ms, during which no stream was read (``bench.streams`` saw every job's
    text stall at each one). So the objects that exist after boot (modules, classes, the wiring) are frozen
    out of every later collection, and the youngest generation is collected after ``gc_young_threshold``
    allocations instead of Python's 700, which makes the costly older-generation passes rarer.

    Parameters:
      prefetch_per_thread: messages held per worker thread and queue (at least 1).
      poll_interval_ms: the longest an idle consumer sleeps between fetches with no wake-up, in milliseconds.
      gc_young_threshold: allocations (net of deallocations) between two collections of the youngest
        generation; None leaves the collector as it is.
    """

    def __init__(
        self, *, prefetch_per_thread: int = 1, poll_interval_ms: int = 100, gc_young_threshold: int | None = 10_000
    ) -> None:
        if prefetch_per_thread < 1:
            raise ValueError("prefetch_per_thread must be at least 1")
        if poll_interval_ms < 10:
            raise ValueError("poll_interval_ms must be at least 10")
        self.prefetch_per_thread = prefetch_per_thread
        self.poll_interval_ms = poll_interval_ms
        self.gc_young_threshold = gc_young_threshold

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Set the prefetch and polling before the worker starts its consumers."""
        worker.queue_prefetch = max(1, worker.worker_threads * self.prefetch_per_thread)
        # Dramatiq's worker timeout (how often each idle worker thread wakes) is kept; only the consumers'
        # idle sleep is set, and consumers that wake on a push need it only as a fallback.
        if hasattr(broker, "idle_poll_ms"):
            broker.idle_poll_ms = self.poll_interval_ms
        else:
            worker.worker_timeout = self.poll_interval_ms
        use_resilient_consumers(worker)
        # Before Dramatiq starts its worker threads, which all share this queue.
        worker.work_queue = ClosableWorkQueue()
        logger.debug("prefetch %d per queue, idle poll every %d ms", worker.queue_prefetch, self.poll_interval_ms)

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        """Freeze what boot built out of later collections, and collect the youngest generation less often."""
        if self.gc_young_threshold is None:
            return
        gc.collect()
        gc.freeze()
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(self.gc_young_threshold, older, oldest)
        logger.debug("%d boot objects frozen out of garbage collection", gc.get_freeze_count())

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Let idle worker threads stop at once (``stop_worker_threads``)."""
        stop_worker_threads(worker)


def stop_worker_threads(worker: Any) -> None:
    """Stop the worker threads as Dramatiq is about to, and end the idle ones' wait on the work queue now.

    An idle Dramatiq worker thread checks whether it should stop once per worker timeout (1 s), so a
    shutdown would wait that long for nothing. Busy threads finish their job first, as before. Called at
    ``before_worker_shutdown``; the work queue must be a ``ClosableWorkQueue`` (set at worker boot).
    """
    for thread in worker.workers:
        thread.stop()
    work_queue = worker.work_queue
    if isinstance(work_queue, ClosableWorkQueue):
        work_queue.close()


class ClosableWorkQueue(queue.PriorityQueue[Any]):
    """Dramatiq's work queue (a ``PriorityQueue``) whose waiting ``get`` calls ``close`` ends at once.

    A closed queue still hands out what it holds (Dramatiq's shutdown puts it back on the broker); once
    it is empty, ``get`` raises ``queue.Empty`` without waiting.

    An idle Dramatiq worker thread waits on this queue for one worker timeout (1 s), wakes to see whether
    it should stop, and waits again: at ``-t 1000`` that is 1,000 wake-ups a second for nothing (about 3 %
    of a core). Since ``close`` tells it to stop, a wait here lasts at least ``idle_wait_s`` instead; the
    bound is kept only so that Dramatiq's ``Worker.pause`` (which waits for every thread to notice) still
    returns, within that time.
    """

    def __init__(self, *, idle_wait_s: float = 30.0) -> None:
        super().__init__()
        self.closed = False
        self.idle_wait_s = idle_wait_s

    def close(self) -> None:
        """Wake every waiting ``get``: each returns an item, or raises ``Empty`` when none is left."""
        with self.not_empty:
            self.closed = True
            self.not_empty.notify_all()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """``Queue.get``, except that a closed, empty queue raises ``Empty`` at once, and that a blocking wait
        lasts at least ``idle_wait_s``."""
        with self.not_empty:
            if block:
                deadline = None if timeout is None else time.monotonic() + max(timeout, self.idle_wait_s)
                while not self._qsize() and not self.closed:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        break
                    self.not_empty.wait(remaining)
            if not self._qsize():
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item
