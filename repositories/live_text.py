"""Live text: the worker appends each job's new text to a Redis Stream, so a web process can relay it at once.

One stream per job (``llm-live:<job_id>``). Its entries say, in order, that an attempt started
(``reset``), which text it produced at which character offset (``text``), and that the attempt
ended (``end``). Offsets count characters of the attempt's text, the same text the job store's
``content`` holds, so a reader can mix both sources without duplicating or losing a character.
A ``status`` entry, written outside any attempt (by a cancel), only tells readers to re-read the store.

The stream is a fast path only: writes are coalesced, trimmed, expired after the job and dropped
while Redis is unreachable. The SQL store stays the source of truth.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "llm-live:"

EntryKind = Literal["reset", "text", "end", "status"]


def stream_key(job_id: str) -> str:
    """The Redis key of a job's live text stream."""
    return KEY_PREFIX + job_id


@dataclass(frozen=True, slots=True)
class LiveEntry:
    """One stream entry: ``reset`` (attempt began), ``text`` (``text`` at ``offset``), ``end`` (attempt ended) or
    ``status`` (the stored job changed outside an attempt, e.g. it was cancelled: re-read the store)."""

    kind: EntryKind
    attempt: int
    offset: int = 0
    text: str = ""

    def fields(self) -> dict[str, str | int]:
        """The entry as Redis Stream fields."""
        values: dict[str, str | int] = {"k": self.kind, "a": self.attempt}
        if self.kind == "text":
            values.update(o=self.offset, x=self.text)
        return values

    @classmethod
    def parse(cls, fields: dict[Any, Any]) -> LiveEntry | None:
        """The entry written by ``fields``, or None when it is not one of ours."""
        values = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in fields.items()}
        try:
            kind = _text(values["k"])
            attempt = int(values["a"])
            if kind == "text":
                return cls("text", attempt, int(values["o"]), _text(values["x"]))
            if kind in ("reset", "end", "status"):
                return cls(kind, attempt)  # type: ignore[arg-type]
        except (KeyError, ValueError, UnicodeDecodeError):
            pass
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LiveText:
    """Where a job runner reports each attempt's text as it arrives; this base ignores it all (live text off)."""

    @contextlib.contextmanager
    def attempt(self, job_id: str, attempt: int) -> Iterator[None]:
        """Bracket one attempt: its text is relayed from the start and everything is written out at its end."""
        yield

    def append(self, job_id: str, attempt: int, text: str) -> None:
        """New text of the job's current attempt (must be called inside ``attempt``)."""

    def status_changed(self, job_id: str) -> None:
        """The job's stored status changed outside an attempt (a cancel): its readers should re-read the store."""


@dataclass(eq=False)
class _Pending:
    """One attempt's stream as the writer thread still owes it to Redis."""

    job_id: str
    attempt: int
    offset: int = 0
    """Characters of this attempt already handed to Redis (or dropped)."""
    pieces: list[str] = field(default_factory=list)
    fresh: bool = True
    """Its ``reset`` is not written yet: the writer deletes the job's stream first, then writes it."""
    ended: bool = False
    """The attempt is over: the writer writes what is left, then ``end``, and forgets it."""
    scheduled: bool = False
    """It is in the writer's heap."""
    last_write: float = 0.0
    expired_at: float = 0.0
    """When (monotonic) the stream's expiry was last set."""


class RedisLiveText(LiveText):
    """Appends each attempt's text to the job's Redis Stream, at most every ``interval_s`` per job.

    Nothing here waits on Redis in the caller's thread: an attempt's start (``reset``), its text and its
    end are queued for one writer thread per process, which writes the entries of every job due at once
    in one pipeline (one round trip), in order per job, and with ``busy_attempts`` attempts running or more,
    at most one pipeline every ``write_gap_s`` (10 ms): a thousand streams' chunks a second go in about a
    hundred round trips, not a thousand, while a few streams' text is written the moment it is due. Text
    after a quiet spell is written at once, text that follows within ``interval_s`` is coalesced; a start
    or an end is written at once. After a Redis error, writes are dropped (with a warning) for
    ``retry_after_s``. The stream is kept at about ``max_entries`` entries, lives ``active_ttl_s`` while
    the job runs (refreshed every ``refresh_ttl_s``) and ``ended_ttl_s`` seconds after the attempt ends.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        interval_s: float = 0.05,
        max_entries: int = 10_000,
        active_ttl_s: int = 3600,
        ended_ttl_s: int = 600,
        retry_after_s: float = 5.0,
        refresh_ttl_s: float = 60.0,
        write_gap_s: float = 0.01,
        busy_attempts: int = 200,
    ) -> None:
        self.client = client
        self.interval_s = interval_s
        self.max_entries = max_entries
        self.active_ttl_s = active_ttl_s
        self.ended_ttl_s = ended_ttl_s
        self.retry_after_s = retry_after_s
        self.refresh_ttl_s = refresh_ttl_s
        self.write_gap_s = write_gap_s
        """The least time between two pipelines once ``busy_attempts`` attempts run (less with fewer): a busy
        writer sends one per ``write_gap_s`` with everything due."""
        self.busy_attempts = busy_attempts
        self._wake_at = float("inf")
        self._pending: dict[str, _Pending] = {}
        """The running attempt of each job, by job id (text for any other attempt is ignored)."""
        self._due: list[tuple[float, int, _Pending | str]] = []
        """A heap of what the writer owes, by when it is due: an attempt's pending entries, or a job id whose
        ``status`` entry is owed. The writer never scans every job."""
        self._statuses: dict[str, int] = {}
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._writing = False
        self._down_until = 0.0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def attempt(self, job_id: str, attempt: int) -> Iterator[None]:
        """Queue ``reset`` (the job's earlier entries are dropped with it), then ``end`` once the attempt is over."""
        pending = _Pending(job_id, attempt)
        with self._lock:
            self._pending[job_id] = pending
            self._schedule(pending, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                pending.ended = True
                if self._pending.get(job_id) is pending:
                    del self._pending[job_id]
                self._schedule(pending, time.monotonic())

    def status_changed(self, job_id: str) -> None:
        """Queue a ``status`` entry, so the job's readers re-read the store at once; never raises.

        It is no attempt's ``end``: a running attempt still ends its entries itself, after its last text.
        """
        with self._lock:
            self._statuses[job_id] = self._statuses.get(job_id, 0) + 1
            self._push(time.monotonic(), job_id)

    def append(self, job_id: str, attempt: int, text: str) -> None:
        """Queue ``text``: written at once when the job's last write is ``interval_s`` old, else when it is.

        It never blocks on Redis: it is called from the worker's stream loop, which serves every job's stream.
        """
        if not text:
            return
        with self._lock:
            pending = self._pending.get(job_id)
            if pending is None or pending.attempt != attempt:
                return
            pending.pieces.append(text)
            self._schedule(pending, max(time.monotonic(), pending.last_write + self.interval_s))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or dropped); False if that took longer than ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._due or self._writing:
                if self._due:
                    # Whatever waits for its coalescing interval is due now.
                    self._due = [(0.0, sequence, item) for _, sequence, item in self._due]
                    heapq.heapify(self._due)
                    self._wake.notify()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    # -- the writer thread ------------------------------------------------------------------------

    def _schedule(self, pending: _Pending, due: float) -> None:
        """Put ``pending`` in the writer's heap (caller holds ``_lock``); an attempt's end is due at once."""
        if pending.scheduled and not pending.ended:
            return
        # (Already waiting for its text's interval, an ended attempt gets a second, earlier heap entry: due now.)
        pending.scheduled = True
        self._push(due, pending)

    def _push(self, due: float, item: _Pending | str) -> None:
        heapq.heappush(self._due, (due, next(self._sequence), item))
        if due < self._wake_at:
            # Otherwise the writer wakes by then anyway (it gathers what comes due meanwhile).
            self._ensure_thread()
            self._wake.notify()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="live-text-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        next_write = 0.0
        while True:
            with self._lock:
                now = time.monotonic()
                if not self._due:
                    self._wake_at = float("inf")
                    self._wake.wait()
                    continue
                start_at = max(self._due[0][0], next_write)
                if start_at > now:
                    self._wake_at = start_at
                    self._wake.wait(start_at - now)
                    continue
                self._wake_at = now
                batch = self._take_due(now)
                self._writing = True
            try:
                self._write_batch(batch)
            finally:
                next_write = time.monotonic() + self._gap()
                with self._lock:
                    self._writing = False
                    if not self._due:
                        self._idle.notify_all()

    def _gap(self) -> float:
        """The pause after a pipeline: ``write_gap_s`` with ``busy_attempts`` or more attempts running, shorter with
        fewer (a few streams keep their text a millisecond or two from the browser; a thousand share round trips)."""
        with self._lock:
            running = len(self._pending)
        return self.write_gap_s * min(1.0, running / self.busy_attempts)

    def _take_due(self, now: float) -> list[tuple[str, list[LiveEntry], bool, int | None]]:
        """Everything due, as (job id, entries, delete the stream first, expiry to set) in the order owed."""
        batch: list[tuple[str, list[LiveEntry], bool, int | None]] = []
        while self._due and self._due[0][0] <= now:
            _, _, item = heapq.heappop(self._due)
            if isinstance(item, str):
                count = self._statuses.pop(item, 0)
                if count:
                    batch.append((item, [LiveEntry("status", 0)] * count, False, self.ended_ttl_s))
                continue
            if not item.scheduled:
                continue  # its second heap entry: written already
            item.scheduled = False
            entries: list[LiveEntry] = [LiveEntry("reset", item.attempt)] if item.fresh else []
            if item.pieces:
                text = "".join(item.pieces)
                entries.append(LiveEntry("text", item.attempt, item.offset, text))
                item.offset += len(text)
                item.pieces.clear()
                item.last_write = now
            ttl: int | None = None
            if item.ended:
                entries.append(LiveEntry("end", item.attempt))
                ttl = self.ended_ttl_s
            elif item.fresh or now - item.expired_at >= self.refresh_ttl_s:
                ttl = self.active_ttl_s
                item.expired_at = now
            if entries:
                batch.append((item.job_id, entries, item.fresh, ttl))
            item.fresh = False
        return batch

    def _write_batch(self, batch: list[tuple[str, list[LiveEntry], bool, int | None]]) -> None:
        """XADD the entries of many jobs in one pipeline (one round trip), in order; never raises.

        A transaction when a stream is deleted and started again in it, so that no reader sees it in between.
        """
        if not batch or time.monotonic() < self._down_until:
            return
        try:
            pipe = self.client.pipeline(transaction=any(fresh for _, _, fresh, _ in batch))
            for job_id, entries, fresh, ttl in batch:
                key = stream_key(job_id)
                if fresh:
                    pipe.delete(key)
                for entry in entries:
                    pipe.xadd(key, entry.fields(), maxlen=self.max_entries, approximate=True)  # type: ignore[arg-type]
                if ttl is not None:
                    pipe.expire(key, ttl)
            pipe.execute()
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + self.retry_after_s
            jobs = {job_id for job_id, _, _, _ in batch}
            extra = {"job_id": next(iter(jobs))} if len(jobs) == 1 else {}
            logger.warning(
                "live text not written (Redis: %s); readers fall back to the job store", type(exc).__name__, extra=extra
            )
