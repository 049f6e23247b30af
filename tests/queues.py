"""A ``JobQueue`` of a test's own: built from the test's settings, bound to the actors for the block, closed after."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from actors.queue import JobQueue
from settings import Settings


@contextlib.contextmanager
def queue_on(settings: Settings) -> Iterator[JobQueue]:
    """``enqueue_*``, ``get_job``, ``cancel_job`` and the actors use a queue built from ``settings`` inside the
    block; the queue bound before is bound again after it."""
    queue = JobQueue(settings)
    queue.services()  # the store migrated and the signals connected now, as a process's first job would
    try:
        with queue.bound():
            yield queue
    finally:
        queue.close()
