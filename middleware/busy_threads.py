"""At most a few worker threads of a process run Python outside their streams at once.

A worker process with a thousand threads holds a thousand jobs, and most of the time every one of them
waits for its stream, which the process's one event loop reads. But jobs start in bursts (a thousand
messages fetched within a second) and end in bursts, and each start or end is a few milliseconds of
Python: decode the message, take the user's slot, claim the row, record the outcome, ack. With hundreds of
threads runnable at once, each wait for the GIL becomes a wait behind hundreds of others: the loop's
thread, which reads every stream, got its turn about once per 100 ms to 1 s, and every running job's text
stalled for that long (``bench.streams``: the gaps fell exactly where jobs started or ended), while
PostgreSQL claims queued for the pool's connections.

``BusyThreads`` is a semaphore around that work: a thread takes a slot when it starts a message (the
first middleware's ``before_process_message``), gives it back while it waits for its stream, takes it
again when the stream ends, and gives it back after the last middleware's after-hook. The threads over
the limit wait blocked, out of the GIL's queue, and the burst's total work is unchanged.

Nothing held with a slot waits for another thread that needs one: the store's writer threads, the live
text writer, the consumers and the event loop take none.

A process of few threads is not gated (``BusyThreadsGate``'s ``from_threads``, 64): it never has hundreds
of threads runnable at once, so the gate has nothing to win there and only adds its own steps (``bench.cancel``
at 16 threads measured 4.3 to 4.6 ms p50 from a cancel to the stream's close with it, 3.7 to 3.8 ms
without; that is within this machine's spread between runs, 2.8 to 5.4 ms, so it decided nothing alone).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import dramatiq

#: Slots per process: one thread's SQL or Redis round trip overlaps another's Python. Four starved the loop and the
#: progress writer at the start of 1,000 streams on PostgreSQL once a claim became one round trip (``bench.streams``:
#: 44 to 48 of 50 jobs grew every second with four, 50 of 50 in four runs with two).
DEFAULT_SLOTS = 2

#: Worker processes with at least this many threads are gated.
GATED_FROM_THREADS = 64


class BusyThreads:
    """A slot per thread running Python outside its stream, ``slots`` of them (see the module docstring)."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.slots = slots
        self.gating = True
        """False: every thread runs freely (``enter`` and ``leave`` do nothing)."""
        self._semaphore = threading.BoundedSemaphore(slots)
        self._holding = threading.local()

    def holds(self) -> bool:
        """Whether this thread holds a slot."""
        return bool(getattr(self._holding, "slot", False))

    def enter(self) -> None:
        """Take a slot for this thread, waiting for one; nothing when it holds one already."""
        if self.gating and not self.holds():
            self._semaphore.acquire()
            self._holding.slot = True

    def leave(self) -> None:
        """Give this thread's slot back; nothing when it holds none."""
        if self.holds():
            self._holding.slot = False
            self._semaphore.release()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold a slot for the block; one taken here is given back after it, one held before is kept."""
        entered = not self.holds()
        self.enter()
        try:
            yield
        finally:
            if entered:
                self.leave()

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Give this thread's slot back for the block (it waits for its stream), and take one again after."""
        holding = self.holds()
        self.leave()
        try:
            yield
        finally:
            if holding:
                self.enter()


class BusyThreadsGate(dramatiq.Middleware):
    """Holds a ``BusyThreads`` slot from a message's first before-hook to its last after-hook.

    It must be the first middleware: Dramatiq runs before-hooks in order and after-hooks in reverse.
    A worker of fewer than ``from_threads`` threads is not gated (see the module docstring).
    """

    def __init__(self, busy: BusyThreads, *, from_threads: int = GATED_FROM_THREADS) -> None:
        self.busy = busy
        self.from_threads = from_threads

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        """Gate the worker's threads only when it has many."""
        self.busy.gating = worker.worker_threads >= self.from_threads

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Take a slot before any other middleware runs."""
        self.busy.enter()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        """Give it back after every other middleware ran."""
        self.busy.leave()

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        """Give it back when a middleware skipped the message."""
        self.busy.leave()
