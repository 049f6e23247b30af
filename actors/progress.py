"""Progress and heartbeats of every running job of a worker process, written in batches by one thread.

A job's stream appends its text to a ``Running`` entry; one writer thread per process writes, in one
transaction each:

- every ``interval_s``, the lease heartbeats of all running jobs (``JobStore.heartbeat_many``), with
  whatever text they have not written yet;
- in between, the new text of each job as it arrives: at most every ``text_interval_s`` per job (its
  pieces are coalesced), and at most every ``text_batch_s`` for the process (all jobs with text due are
  written together, ``JobStore.write_texts``). A job whose text arrives once a second has it stored
  within ``text_batch_s``, not up to ``interval_s`` later: the stored text grows as evenly as it streams.
  An attempt's first text waits ``first_text_after_s`` (0.25 s). A completed attempt's last text is
  still written when it falls due, unless the runner's outcome write (which carries the same text) came
  first: an instant answer is stored in one write, not two, and a slow outcome write (a thousand streams
  ending at once) does not stall the stored text.

At 1,000 concurrent streams that is a few statements per interval instead of 1,000 transactions, and no
SQL ever runs on the event loop that reads the streams.

A job whose lease is no longer its own (cancelled, or taken over after its worker was presumed dead)
has its ``lost`` flag raised: its stream stops, as it did when its own heartbeat found the row gone.
While the store is unreachable the streams go on; the next write that reaches it carries all the text so far.
"""

from __future__ import annotations

import heapq
import itertools
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
    writer: ProgressWriter | None = None
    """The writer that stores it (set by ``ProgressWriter.track``): told when new text is due."""
    text_written_at: float = 0.0
    """When (monotonic) its text was last written."""
    first_text_at: float = 0.0
    """When (monotonic) its first text may be written at the earliest."""
    text_scheduled: bool = False

    @property
    def text(self) -> str:
        """Everything streamed so far."""
        return "".join(self.pieces)

    def append(self, text: str) -> None:
        """Add a streamed piece (from the stream's loop; the writer thread reads it)."""
        self.pieces.append(text)
        self.chars += len(text)
        if not self.text_scheduled and self.writer is not None:
            self.writer.text_due(self)


class ProgressWriter:
    """The writer thread of one process: heartbeats every ``interval_s``, new text as it arrives (batched)."""

    def __init__(
        self,
        store: JobStore,
        *,
        interval_s: float = 0.5,
        text_interval_s: float | None = None,
        text_batch_s: float = 0.02,
        first_text_after_s: float = 0.25,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        """How often every running job's lease is refreshed (with any text not written yet), in seconds."""
        self.text_interval_s = interval_s if text_interval_s is None else text_interval_s
        """The least time between two text writes of one job (its pieces coalesce meanwhile), in seconds."""
        self.text_batch_s = min(text_batch_s, self.text_interval_s)
        """The least time between two text writes of the process (each writes every job due), in seconds."""
        self.first_text_after_s = first_text_after_s
        """How long after an attempt starts its first text may be written: an instant answer (most previews, short
        generations) then ends before it, and its text is stored with its outcome alone, in one write, not two."""
        self._running: set[Running] = set()
        self._ending: dict[Running, float] = {}
        """Completed attempts with text not written yet, and when it is due (``settled`` drops one: no write)."""
        self._texts: list[tuple[float, int, Running]] = []
        """A heap of the attempts with text to write, by when it is due."""
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._wake_at = float("inf")
        """When the writer thread wakes next (monotonic), so that an append wakes it only when it must be sooner."""
        self._thread: threading.Thread | None = None
        self._store_down = False

    def track(self, job_id: str, owner: str) -> Running:
        """Start writing the progress and heartbeat of this attempt."""
        running = Running(job_id, owner, writer=self, first_text_at=time.monotonic() + self.first_text_after_s)
        with self._lock:
            first = not self._running
            self._running.add(running)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="progress-writer", daemon=True)
                self._thread.start()
            elif first:
                self._wake.notify()  # it waits with no deadline while nothing runs
        return running

    def untrack(self, running: Running, *, completed: bool = False) -> None:
        """Stop writing for this attempt (it ended; its outcome is written by the runner).

        When it ``completed``, text it streamed that is not written yet is still written when it falls due, as
        if the attempt were running (``text_interval_s`` after its last write, not before ``first_text_after_s``),
        unless the runner's outcome write, which carries the same text, landed first and ``settled`` said so.
        That write may wait behind hundreds of others when many streams end at once, and the stored text must
        not stall meanwhile; an instant answer's outcome comes first, and no write is added for it.
        A text write only lands while the job is still processing under this attempt's lease, so it never
        overwrites the outcome. An attempt that ended otherwise (cancelled, failed, handed back) has no text
        worth a write of its own.
        """
        with self._lock:
            self._running.discard(running)
            if not completed or running.chars == running.flushed_chars:
                return
            due = self._due(running)
            self._ending[running] = due
            running.text_scheduled = True
            heapq.heappush(self._texts, (due, next(self._sequence), running))
            if due < self._wake_at:
                self._wake.notify()

    def settled(self, running: Running) -> None:
        """The outcome of this ended attempt is written (or will never be by it): its text needs no write of its own."""
        with self._lock:
            self._ending.pop(running, None)

    def text_due(self, running: Running) -> None:
        """``running`` has new text: due now, or ``text_interval_s`` after its last write (its pieces coalesce)."""
        with self._lock:
            if running.text_scheduled or running not in self._running:
                return
            running.text_scheduled = True
            due = self._due(running)
            heapq.heappush(self._texts, (due, next(self._sequence), running))
            if due < self._wake_at:
                self._wake.notify()

    def _due(self, running: Running) -> float:
        """When the attempt's new text may be written: not before its first text may, nor within ``text_interval_s``
        of its last write."""
        return max(time.monotonic(), running.text_written_at + self.text_interval_s, running.first_text_at)

    def _run(self) -> None:
        next_beat = time.monotonic() + self.interval_s
        texts_written_at = 0.0
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    if not self._running and not self._texts:
                        self._wake_at = float("inf")
                        self._wake.wait()
                        next_beat = time.monotonic() + self.interval_s
                        continue
                    due = [next_beat] if self._running else []  # only texts of ended attempts are left otherwise
                    if self._texts:
                        due.append(max(self._texts[0][0], texts_written_at + self.text_batch_s))
                    self._wake_at = min(due)
                    if now >= self._wake_at:
                        break
                    self._wake.wait(self._wake_at - now)
                self._wake_at = now
                beat = now >= next_beat and bool(self._running)
                if beat:
                    batch = list(self._running)
                    ending = [running for running, due in self._ending.items() if due <= now]
                    # What stays due: ended attempts not due yet (running ones are all written now).
                    self._texts = [entry for entry in self._texts if self._ending.get(entry[2], now) > now]
                    heapq.heapify(self._texts)
                else:
                    batch, ending = [], []
                    while self._texts and self._texts[0][0] <= now:
                        running = heapq.heappop(self._texts)[2]
                        if running in self._running:
                            batch.append(running)
                        elif self._ending.get(running, float("inf")) <= now:
                            ending.append(running)
                    ending = list(dict.fromkeys(ending))  # pushed twice when it ended with its text due later
                for running in (*batch, *ending):
                    running.text_scheduled = False
                for running in ending:
                    del self._ending[running]
            try:
                if beat:
                    next_beat = now + self.interval_s
                    self.write(batch)
                    if ending:
                        self.write_texts(ending)
                else:
                    texts_written_at = now
                    self.write_texts(batch + ending)
            except Exception:
                logger.exception("progress write failed; the next interval tries again")

    def write(self, batch: list[Running]) -> None:
        """Write the heartbeats and grown texts of ``batch`` now, and raise ``lost`` on those no longer held."""
        now = time.monotonic()
        beats: list[Heartbeat] = []
        sizes: list[int] = []
        for running in batch:
            content = self._new_text(running)
            beats.append(Heartbeat(running.job_id, running.owner, content))
            sizes.append(len(content) if content is not None else running.flushed_chars)
        try:
            lost = self.store.heartbeat_many(beats)
        except Exception as error:
            self._failed(error)
            return
        self._answered()
        for running, beat, size in zip(batch, beats, sizes, strict=True):
            if running.owner in lost:
                running.lost.set()
            else:
                running.flushed_chars = size
                if beat.content is not None:
                    running.text_written_at = now

    def write_texts(self, batch: list[Running]) -> None:
        """Write the grown texts of ``batch`` now (a lease no longer held is found by the next heartbeat)."""
        now = time.monotonic()
        texts = [(running, self._new_text(running)) for running in batch]
        beats = [Heartbeat(running.job_id, running.owner, content) for running, content in texts if content is not None]
        if not beats:
            return
        try:
            self.store.write_texts(beats)
        except Exception as error:
            self._failed(error)
            return
        self._answered()
        for running, content in texts:
            if content is not None:
                running.flushed_chars = len(content)
                running.text_written_at = now

    @staticmethod
    def _new_text(running: Running) -> str | None:
        """All of the attempt's text, when it grew since its last write."""
        return "".join(running.pieces[:]) if running.chars != running.flushed_chars else None

    def _failed(self, error: Exception) -> None:
        if not is_store_outage(error):
            raise error
        # Only the write failed: the streams go on, and the next write carries all the text so far.
        if not self._store_down:
            logger.warning("job store unreachable (%s): streaming on", type(error).__name__)
        self._store_down = True

    def _answered(self) -> None:
        if self._store_down:
            logger.info("job store reachable again: progress written")
            self._store_down = False
