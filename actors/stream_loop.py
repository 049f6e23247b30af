"""One event loop per worker process: every job's provider stream runs on it.

Dramatiq's model stays as it is: each job holds a worker thread, and its message stays unacked until
the job is done. The worker thread hands the stream's coroutine to this loop and waits for its result,
so a thousand concurrent streams cost one loop and a thousand sleeping threads, not a thousand loops,
and a provider keeps one connection pool (keep-alive) for every job of the process.

The waiting thread wakes every ``poll_s`` so that the exceptions Dramatiq raises asynchronously in a
worker thread (``TimeLimitExceeded``, ``Shutdown``) still reach it. Such an exception cancels the
coroutine on the loop, waits briefly for it to close its stream, and propagates as before. They are
back-stops only: an attempt ends itself at its own wall-clock limit, a minute before Dramatiq's time
limit, and a worker shutting down hands its jobs back through their cancel watches. So the wait is long
(10 s): a thousand waiting threads that woke every second cost the loop a thousand GIL switches a second.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from repositories.chat import close_clients

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

#: How long an interrupted worker thread waits for its cancelled coroutine to close its stream, in seconds.
CANCEL_GRACE_S = 5.0


class StreamLoop:
    """A process-wide asyncio loop in a daemon thread, started on first use; ``run`` blocks the calling thread."""

    def __init__(self, *, poll_s: float = 10.0, name: str = "stream-loop") -> None:
        self.poll_s = poll_s
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (started if it is not yet)."""
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                self._loop = asyncio.new_event_loop()
                ready = threading.Event()
                self._thread = threading.Thread(
                    target=self._serve, args=(self._loop, ready), name=self._name, daemon=True
                )
                self._thread.start()
                ready.wait()
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def run(self, coroutine: Coroutine[Any, Any, Result]) -> Result:
        """Run ``coroutine`` on the loop and return its result (or raise its exception) in this thread."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            while not future.done():
                concurrent.futures.wait([future], timeout=self.poll_s)
        except BaseException:
            # An exception raised in this thread by Dramatiq (time limit, shutdown): stop the stream too.
            future.cancel()
            concurrent.futures.wait([future], timeout=CANCEL_GRACE_S)
            raise
        return future.result()

    def close(self) -> None:
        """Stop the loop once its current callbacks ran (worker shutdown); a later ``run`` starts a new one."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None and thread.is_alive():
            closing = asyncio.run_coroutine_threadsafe(close_clients(), loop)
            concurrent.futures.wait([closing], timeout=CANCEL_GRACE_S)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=CANCEL_GRACE_S)
