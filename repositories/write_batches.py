"""Writes of many threads combined into one transaction by one writer thread.

A worker process with a thousand threads claims a thousand jobs at once (and completes them at once
half a minute later). One transaction each means a thousand lock acquisitions and commits, and on
SQLite a thousand turns at its single write lock, each taken by a thread that then waits for the GIL
among a thousand others. ``WriteBatches`` combines them instead: a caller queues its statement and
waits; one writer thread per store writes everything queued so far in one transaction and hands each
caller its own result. One caller alone is written at once, in a transaction of its own.

The writer is a thread of its own rather than one of the callers: an exception raised in a waiting caller
from outside (Dramatiq raises its time limit asynchronously in a worker thread) lands once its wait ends,
and a caller that was to write the next batch would then leave the others waiting for ever. Callers wait
without waking: a thousand of them waking ten times a second cost more than the batches save.

A batch whose transaction fails for a reason other than an outage is written again one statement per
transaction, so that one bad statement fails only its own caller; an outage fails each of them at once,
as it would have failed each alone.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

#: One statement of a batch: run it on the batch's connection and return what its caller gets.
Write = Callable[[Connection], Any]

#: What a queued statement holds until it was written.
_UNSET: Any = object()


class _Queued(Generic[Result]):
    """One caller's statement, and what it got back."""

    __slots__ = ("done", "error", "result", "write")

    def __init__(self, write: Write) -> None:
        self.write = write
        self.done = threading.Event()
        self.result: Any = _UNSET
        self.error: BaseException | None = None


class WriteBatches:
    """Combine the statements of concurrent callers into one transaction (see the module docstring).

    Parameters:
      transaction: opens one write transaction (``JobStore``'s, with its SQLite lock) and yields its connection.
      is_outage: tells an error that any statement would meet (the store is unreachable) from one of a statement.
      max_batch: statements written in one transaction at most.
    """

    def __init__(
        self,
        transaction: Callable[[], AbstractContextManager[Connection]],
        *,
        is_outage: Callable[[BaseException], bool],
        max_batch: int = 500,
    ) -> None:
        self._transaction = transaction
        self._is_outage = is_outage
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self._queue: list[_Queued[Any]] = []
        self._thread: threading.Thread | None = None

    def write(self, write: Write) -> Any:
        """Run ``write`` in a transaction shared with the other callers of the moment; return its result."""
        mine: _Queued[Any] = _Queued(write)
        with self._lock:
            self._queue.append(mine)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
                self._thread.start()
            self._queued.notify()
        mine.done.wait()
        if mine.error is not None:
            raise mine.error
        return mine.result

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._queued.wait()
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                self._write_batch(batch)
            except BaseException as error:  # never leave a caller waiting, whatever happened
                logger.exception("store writer failed a batch")
                for queued in batch:
                    if queued.error is None and queued.result is _UNSET:
                        queued.error = error
            finally:
                for queued in batch:
                    queued.done.set()

    def _write_batch(self, batch: list[_Queued[Any]]) -> None:
        try:
            with self._transaction() as connection:
                results = [queued.write(connection) for queued in batch]
        except Exception as error:
            if len(batch) == 1 or self._is_outage(error):
                for queued in batch:
                    queued.error = error
                return
            for queued in batch:  # one by one: only a statement that fails alone fails its caller
                self._write_batch([queued])
            return
        for queued, result in zip(batch, results, strict=True):
            queued.result = result
