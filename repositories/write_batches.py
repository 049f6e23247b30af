"""Writes of many threads combined into one transaction: the first caller writes for everyone waiting.

A worker process with a thousand threads claims a thousand jobs at once (and completes them at once
half a minute later). One transaction each means a thousand lock acquisitions and commits, and on
SQLite a thousand turns at its single write lock, each taken by a thread that then waits for the GIL
among a thousand others. ``WriteBatches`` combines them instead (flat combining): a caller queues its
statement; if no batch is being written, it writes the queue, every statement in one transaction, and
hands the results out; the callers that queued meanwhile wait, and the first of them writes the next
batch. No thread of its own, nothing waits longer than one batch before its own is written, and one
caller alone writes alone, at once.

A batch whose transaction fails for a reason other than an outage is written again one statement per
transaction, so that one bad statement fails only its own caller; an outage fails each of them at once,
as it would have failed each alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection

Result = TypeVar("Result")

#: One statement of a batch: run it on the batch's connection and return what its caller gets.
Write = Callable[[Connection], Any]


class _Queued(Generic[Result]):
    """One caller's statement, and what it got back."""

    __slots__ = ("done", "error", "lead", "result", "write")

    def __init__(self, write: Write) -> None:
        self.write = write
        self.done = threading.Event()
        self.lead = False
        """Set with ``done`` when this caller is to write the next batch (its own statement is in it)."""
        self.result: Any = None
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
        self._queue: list[_Queued[Any]] = []
        self._writing = False

    def write(self, write: Write) -> Any:
        """Run ``write`` in a transaction shared with the other callers of the moment; return its result."""
        mine: _Queued[Any] = _Queued(write)
        with self._lock:
            self._queue.append(mine)
            lead = not self._writing
            self._writing = True
        if not lead:
            mine.done.wait()
            if not mine.lead:
                return _outcome(mine)
        self._write_batches()
        return _outcome(mine)

    def _write_batches(self) -> None:
        """Write one batch, then hand the writing over to the first caller still waiting, if any."""
        with self._lock:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        try:
            self._write_batch(batch)
        finally:
            for queued in batch:
                queued.done.set()
            with self._lock:
                if self._queue:
                    following = self._queue[0]
                    following.lead = True
                    following.done.set()
                else:
                    self._writing = False

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


def _outcome(queued: _Queued[Any]) -> Any:
    if queued.error is not None:
        raise queued.error
    return queued.result
