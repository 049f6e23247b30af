"""``ClosableWorkQueue``: idle worker threads wait long, and a shutdown ends their wait at once."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from middleware.worker_tuning import ClosableWorkQueue


def _get_in_thread(work_queue: ClosableWorkQueue, timeout: float | None) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def get() -> None:
        try:
            outcome.append(work_queue.get(timeout=timeout))
        except queue.Empty as empty:
            outcome.append(empty)

    thread = threading.Thread(target=get, daemon=True)
    thread.start()
    return thread, outcome


def test_an_idle_wait_lasts_the_idle_wait_not_dramatiqs_worker_timeout() -> None:
    # Given an empty queue whose idle wait is 0.3 s
    work_queue = ClosableWorkQueue(idle_wait_s=0.3)
    # When a worker thread waits with Dramatiq's timeout of 10 ms
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        work_queue.get(timeout=0.01)
    # Then it waited the idle wait, not the timeout
    assert time.monotonic() - started >= 0.3


def test_closing_ends_every_idle_wait_at_once() -> None:
    # Given threads waiting on an empty queue whose idle wait is an hour
    work_queue = ClosableWorkQueue(idle_wait_s=3600)
    waiters = [_get_in_thread(work_queue, timeout) for timeout in (1.0, None)]
    # When it is closed
    work_queue.close()
    # Then every wait ends with Empty
    for thread, outcome in waiters:
        thread.join(timeout=5)
        assert not thread.is_alive()
        assert len(outcome) == 1
        assert isinstance(outcome[0], queue.Empty)


def test_an_item_put_wakes_a_waiting_thread_and_a_closed_queue_still_hands_out_what_it_holds() -> None:
    # Given a thread waiting on an empty queue whose idle wait is an hour
    work_queue = ClosableWorkQueue(idle_wait_s=3600)
    thread, outcome = _get_in_thread(work_queue, 1.0)
    # When an item is put
    work_queue.put((1, "first"))
    thread.join(timeout=5)
    # Then the waiting thread gets it
    assert outcome == [(1, "first")]
    # And after close, what is left is still handed out before Empty
    work_queue.put((2, "second"))
    work_queue.close()
    assert work_queue.get(timeout=1.0) == (2, "second")
    with pytest.raises(queue.Empty):
        work_queue.get(timeout=1.0)
