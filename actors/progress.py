"""Progress and heartbeats of every running job of a worker process, written together once per interval.

A job's stream appends its text to a ``Running`` entry; one writer thread per process sends all the
new texts and lease heartbeats in one transaction every ``interval_s`` (``JobStore.heartbeat_many``).
At 1,000 concurrent streams that is two statements per interval instead of 1,000 transactions, and
no SQL ever runs on the event loop that reads the streams.

A job whose lease is no longer its own (cancelled, or taken over after its worker was presumed dead)
has its ``lost`` flag raised: its stream stops, as it did when its own heartbeat found the row gone.
While the store is unreachable the streams go on; the next write that reaches it carries all the text so far.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from actors.cancellation import LoopFlag
from repositories.store import Heartbeat, JobStore, is_store_outage

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Running:
    """One attempt's text as it streams, and the flag raised once its lease is found lost."""

    job_id: str
    owner: str
    pieces: list[str] = field(default_factory=list)
    flushed_chars: int = 0
    chars: int = 0
    lost: LoopFlag = field(default_factory=LoopFlag)

    @property
    def text(self) -> str:
        """Everything streamed so far."""
        return "".join(self.pieces)

    def append(self, text: str) -> None:
        """Add a streamed piece (from the stream's loop; the writer thread reads it)."""
        self.pieces.append(text)
        self.chars += len(text)


class ProgressWriter:
    """The writer thread of one process: every ``interval_s``, one ``heartbeat_many`` for all tracked attempts."""

    def __init__(self, store: JobStore, *, interval_s: float = 0.5) -> None:
        self.store = store
        self.interval_s = interval_s
        self._running: set[Running] = set()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._store_down = False

    def track(self, job_id: str, owner: str) -> Running:
        """Start writing the progress and heartbeat of this attempt."""
        running = Running(job_id, owner)
        with self._lock:
            self._running.add(running)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="progress-writer", daemon=True)
                self._thread.start()
        return running

    def untrack(self, running: Running) -> None:
        """Stop writing for this attempt (it ended; its outcome is written by the runner)."""
        with self._lock:
            self._running.discard(running)

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval_s
        while True:
            with self._lock:
                while not self._running or time.monotonic() < next_at:
                    if not self._running:
                        self._wake.wait(timeout=self.interval_s)
                        next_at = time.monotonic() + self.interval_s
                        continue
                    self._wake.wait(timeout=max(0.0, next_at - time.monotonic()))
                batch = list(self._running)
            next_at = time.monotonic() + self.interval_s
            try:
                self.write(batch)
            except Exception:
                logger.exception("progress write failed; the next interval tries again")

    def write(self, batch: list[Running]) -> None:
        """Write the heartbeats and grown texts of ``batch`` now, and raise ``lost`` on those no longer held."""
        beats: list[Heartbeat] = []
        sizes: list[int] = []
        for running in batch:
            chars = running.chars
            content = "".join(running.pieces[:]) if chars != running.flushed_chars else None
            beats.append(Heartbeat(running.job_id, running.owner, content))
            sizes.append(len(content) if content is not None else running.flushed_chars)
        try:
            lost = self.store.heartbeat_many(beats)
        except Exception as error:
            if not is_store_outage(error):
                raise
            # Only the write failed: the streams go on, and the next write carries all the text so far.
            if not self._store_down:
                logger.warning("job store unreachable (%s): streaming on", type(error).__name__)
            self._store_down = True
            return
        if self._store_down:
            logger.info("job store reachable again: progress written")
            self._store_down = False
        for running, size in zip(batch, sizes, strict=True):
            if running.owner in lost:
                running.lost.set()
            else:
                running.flushed_chars = size
