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


@dataclass
class _Pending:
    attempt: int
    offset: int = 0
    """Characters of this attempt already handed to Redis (or dropped)."""
    pieces: list[str] = field(default_factory=list)
    due: float = 0.0
    last_write: float = 0.0


class RedisLiveText(LiveText):
    """Appends each attempt's text to the job's Redis Stream, at most every ``interval_s`` per job.

    Text is handed to one writer thread per process: text after a quiet spell is written at once, text
    that follows within ``interval_s`` is coalesced, and the writes of all jobs due together go in one
    pipeline. After a Redis error, writes are dropped (with a warning) for ``retry_after_s``, so they
    never hold up the provider stream for long. The stream is kept at about ``max_entries`` entries,
    lives ``active_ttl_s`` after each write while the job runs, and ``ended_ttl_s`` seconds after the
    attempt ends.
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
    ) -> None:
        self.client = client
        self.interval_s = interval_s
        self.max_entries = max_entries
        self.active_ttl_s = active_ttl_s
        self.ended_ttl_s = ended_ttl_s
        self.retry_after_s = retry_after_s
        self._pending: dict[str, _Pending] = {}
        self._due: list[tuple[float, int, str, _Pending]] = []
        """A heap of the pendings with queued text, by when they are due: the writer never scans every job."""
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._write_lock = threading.Lock()
        """Held while writing, so the entries of one job reach Redis in the order they were produced."""
        self._down_until = 0.0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def attempt(self, job_id: str, attempt: int) -> Iterator[None]:
        """Write ``reset`` (dropping earlier attempts' entries), then ``end`` once the attempt is over."""
        with self._write_lock:
            with self._lock:
                self._pending[job_id] = _Pending(attempt)
            self._write(job_id, [LiveEntry("reset", attempt)], ttl_s=self.active_ttl_s, fresh=True)
        try:
            yield
        finally:
            with self._write_lock:
                with self._lock:
                    pending = self._pending.pop(job_id, None)
                entries = [] if pending is None else self._take(pending)
                self._write(job_id, [*entries, LiveEntry("end", attempt)], ttl_s=self.ended_ttl_s)

    def status_changed(self, job_id: str) -> None:
        """Append a ``status`` entry, so the job's readers re-read the store at once; never raises.

        It is no attempt's ``end``: a running attempt still ends its entries itself, after its last text.
        """
        with self._write_lock:
            self._write(job_id, [LiveEntry("status", 0)], ttl_s=self.ended_ttl_s)

    def append(self, job_id: str, attempt: int, text: str) -> None:
        """Queue ``text`` for the writer thread: written at once when the job's last write is ``interval_s`` old.

        It never blocks on Redis: it is called from the worker's stream loop, which serves every job's stream.
        """
        if not text:
            return
        with self._lock:
            pending = self._pending.get(job_id)
            if pending is None or pending.attempt != attempt:
                return
            first = not pending.pieces
            pending.pieces.append(text)
            if first:
                pending.due = max(time.monotonic(), pending.last_write + self.interval_s)
                heapq.heappush(self._due, (pending.due, next(self._sequence), job_id, pending))
                if self._due[0][3] is pending:
                    self._ensure_thread()
                    self._wake.notify()

    def _take(self, pending: _Pending) -> list[LiveEntry]:
        """The queued text of ``pending`` as one entry (caller holds ``_lock``)."""
        if not pending.pieces:
            return []
        text = "".join(pending.pieces)
        entry = LiveEntry("text", pending.attempt, pending.offset, text)
        pending.offset += len(text)
        pending.pieces.clear()
        pending.last_write = time.monotonic()
        return [entry]

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="live-text-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                if not self._due or self._due[0][0] > now:
                    self._wake.wait(timeout=None if not self._due else self._due[0][0] - now)
                    continue
            with self._write_lock:
                with self._lock:
                    now = time.monotonic()
                    batches: dict[str, list[LiveEntry]] = {}
                    while self._due and self._due[0][0] <= now:
                        _, _, job_id, pending = heapq.heappop(self._due)
                        if self._pending.get(job_id) is pending and pending.pieces:
                            batches[job_id] = self._take(pending)
                self._write_many(batches, ttl_s=self.active_ttl_s)

    def _write_many(self, batches: dict[str, list[LiveEntry]], *, ttl_s: int, fresh: bool = False) -> None:
        """XADD the entries of many jobs in one pipeline (one round trip) and refresh their expiry; never raises.

        With ``fresh``, each job's stream is deleted first, in the same transaction as its new entries.
        """
        batches = {job_id: entries for job_id, entries in batches.items() if entries}
        if not batches or time.monotonic() < self._down_until:
            return
        try:
            pipe = self.client.pipeline(transaction=fresh)
            for job_id, entries in batches.items():
                key = stream_key(job_id)
                if fresh:
                    pipe.delete(key)
                for entry in entries:
                    pipe.xadd(key, entry.fields(), maxlen=self.max_entries, approximate=True)  # type: ignore[arg-type]
                pipe.expire(key, ttl_s)
            pipe.execute()
        except redis.RedisError as exc:
            self._down_until = time.monotonic() + self.retry_after_s
            extra = {"job_id": next(iter(batches))} if len(batches) == 1 else {}
            logger.warning(
                "live text not written (Redis: %s); readers fall back to the job store", type(exc).__name__, extra=extra
            )

    def _write(self, job_id: str, entries: list[LiveEntry], *, ttl_s: int, fresh: bool = False) -> None:
        """The entries of one job (after deleting its stream when ``fresh``); never raises."""
        self._write_many({job_id: entries}, ttl_s=ttl_s, fresh=fresh)
