"""WriteBatches: the statements of concurrent threads in one transaction, each caller with its own outcome."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from repositories.write_batches import WriteBatches
from tests.harness import wait_until


class Outage(Exception):
    """What every statement of the moment would meet."""


class Interrupted(Exception):
    """Raised in a waiting caller's thread from outside, as Dramatiq raises its time limit."""


class FakeTransactions:
    """Transactions that take a moment (so that callers overlap) and count how many were opened."""

    def __init__(self, *, fail_with: Exception | None = None) -> None:
        self.opened = 0
        self.fail_with = fail_with
        self.in_transaction = threading.Event()
        self.release = threading.Event()

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Any]:
        self.opened += 1
        self.in_transaction.set()
        self.release.wait(5)
        if self.fail_with is not None:
            raise self.fail_with
        yield "connection"


def _run_while_the_first_batch_is_open(
    batches: WriteBatches, transactions: FakeTransactions, writes: list[Any]
) -> list[Any]:
    """Start the first write, queue the others while its transaction is open, then let everything finish."""
    outcomes: list[Any] = [None] * len(writes)

    def call(index: int) -> None:
        try:
            outcomes[index] = batches.write(writes[index])
        except Exception as error:
            outcomes[index] = error

    first = threading.Thread(target=call, args=(0,))
    first.start()
    assert transactions.in_transaction.wait(5)
    others = [threading.Thread(target=call, args=(index,)) for index in range(1, len(writes))]
    for thread in others:
        thread.start()
    wait_until(lambda: len(batches._queue) == len(others), timeout=5, interval=0.001, what="every caller to queue")
    transactions.release.set()
    for thread in [first, *others]:
        thread.join(5)
    return outcomes


def test_callers_queued_behind_an_open_batch_share_the_next_transaction_and_get_their_own_results() -> None:
    # Given a batch being written
    transactions = FakeTransactions()
    batches = WriteBatches(transactions, is_outage=lambda error: isinstance(error, Outage))
    writes = [lambda connection, index=index: (index, connection) for index in range(20)]
    # When 19 more callers write meanwhile
    outcomes = _run_while_the_first_batch_is_open(batches, transactions, writes)
    # Then each got its own result, and all 19 were written in one more transaction
    assert outcomes == [(index, "connection") for index in range(20)]
    assert transactions.opened == 2


def test_a_statement_that_fails_fails_only_its_own_caller() -> None:
    # Given a batch in which one statement fails
    transactions = FakeTransactions()
    batches = WriteBatches(transactions, is_outage=lambda error: isinstance(error, Outage))

    def bad(connection: Any) -> Any:
        raise ValueError("this statement is wrong")

    writes: list[Any] = [lambda connection: "first", lambda connection: "a", bad, lambda connection: "b"]
    # When they are written together
    outcomes = _run_while_the_first_batch_is_open(batches, transactions, writes)
    # Then only the bad statement's caller gets its error: the others were written again one by one
    assert outcomes[:2] == ["first", "a"]
    assert isinstance(outcomes[2], ValueError)
    assert outcomes[3] == "b"


def test_an_outage_fails_every_caller_of_the_batch_at_once() -> None:
    # Given a store that is down
    transactions = FakeTransactions(fail_with=Outage("store down"))
    batches = WriteBatches(transactions, is_outage=lambda error: isinstance(error, Outage))
    writes = [lambda connection, index=index: index for index in range(10)]
    # When ten callers write
    outcomes = _run_while_the_first_batch_is_open(batches, transactions, writes)
    # Then each gets the outage, after two transactions (not one more per caller)
    assert all(isinstance(outcome, Outage) for outcome in outcomes)
    assert transactions.opened == 2


def test_one_caller_alone_writes_at_once_in_its_own_transaction() -> None:
    transactions = FakeTransactions()
    transactions.release.set()
    batches = WriteBatches(transactions, is_outage=lambda error: False)
    assert batches.write(lambda connection: 42) == 42
    assert transactions.opened == 1
    with pytest.raises(ZeroDivisionError):
        batches.write(lambda connection: 1 // 0)


def test_a_caller_interrupted_while_it_waits_leaves_no_one_waiting_for_a_batch() -> None:
    # Given a batch being written, with callers queued behind it
    transactions = FakeTransactions()
    batches = WriteBatches(transactions, is_outage=lambda error: False)
    outcomes: dict[str, Any] = {}

    def call(name: str) -> None:
        try:
            outcomes[name] = batches.write(lambda connection: name)
        except BaseException as error:  # the interruption lands here
            outcomes[name] = error

    callers = {name: threading.Thread(target=call, args=(name,)) for name in ("first", "interrupted", "last")}
    callers["first"].start()
    assert transactions.in_transaction.wait(5)
    callers["interrupted"].start()
    wait_until(lambda: len(batches._queue) == 1, timeout=5, interval=0.001, what="the second caller to queue")
    callers["last"].start()
    wait_until(lambda: len(batches._queue) == 2, timeout=5, interval=0.001, what="the third caller to queue")
    # When one queued caller is interrupted the way Dramatiq's time limit interrupts a worker thread
    thread_id = callers["interrupted"].ident
    assert thread_id is not None
    assert ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(Interrupted)) == 1
    transactions.release.set()
    for thread in callers.values():
        thread.join(5)
    # Then the interrupted caller got its interruption, and the callers around it got their results
    assert isinstance(outcomes["interrupted"], Interrupted)
    assert outcomes.get("first") == "first"
    assert outcomes.get("last") == "last", "the caller queued behind the interrupted one was left waiting"
    assert not any(thread.is_alive() for thread in callers.values())
