"""``BusyThreads``: a few slots for threads running outside their streams, taken and given back on every path."""

from __future__ import annotations

import threading
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import SkipMessage

from middleware.busy_threads import BusyThreads, BusyThreadsGate
from tests.harness import wait_until


def _free_slots(busy: BusyThreads) -> int:
    """Slots nobody holds, counted by taking them all without waiting (and giving them back)."""
    taken = 0
    while busy._semaphore.acquire(blocking=False):
        taken += 1
    for _ in range(taken):
        busy._semaphore.release()
    return taken


def test_a_thread_waiting_for_its_stream_frees_its_slot_and_takes_one_again_after() -> None:
    # Given one slot, held by a thread that then waits for its stream
    busy = BusyThreads(1)
    streaming, stream_ended, other_ran = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def job() -> None:
        with busy.held():
            with busy.released():
                streaming.set()
                stream_ended.wait(5)
            order.append("recorded")

    def other() -> None:
        with busy.held():
            order.append("other")
            other_ran.set()

    first = threading.Thread(target=job)
    first.start()
    assert streaming.wait(5)
    # When another thread needs a slot meanwhile
    second = threading.Thread(target=other)
    second.start()
    # Then it gets the one the streaming thread gave back, and the first thread records after taking a slot again
    assert other_ran.wait(5)
    stream_ended.set()
    first.join(5)
    second.join(5)
    assert order == ["other", "recorded"]
    assert _free_slots(busy) == 1


def test_holding_twice_in_one_thread_takes_one_slot_and_leaving_without_one_does_nothing() -> None:
    busy = BusyThreads(2)
    with busy.held(), busy.held():
        assert _free_slots(busy) == 1
    assert _free_slots(busy) == 2
    busy.leave()
    assert _free_slots(busy) == 2
    with pytest.raises(ValueError, match="slots"):
        BusyThreads(0)


class _SkipMarked(dramatiq.Middleware):
    """Skips a message whose first argument is ``"skip"``, as the throttle skips a parked one."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if message.args and message.args[0] == "skip":
            raise SkipMessage()


def test_the_gate_gives_every_slot_back_after_a_message_ran_failed_or_was_skipped() -> None:
    # Given a worker whose first middleware is the gate, with two slots
    busy = BusyThreads(2)
    broker = StubBroker(middleware=[BusyThreadsGate(busy, from_threads=4), _SkipMarked()])
    broker.emit_after("process_boot")
    handled: list[str] = []

    @dramatiq.actor(broker=broker)
    def task(kind: str) -> None:
        handled.append(kind)
        assert busy.holds(), "the actor runs holding a slot"
        if kind == "fail":
            raise RuntimeError("this job fails")

    worker = dramatiq.Worker(broker, worker_threads=4, worker_timeout=50)
    worker.start()
    try:
        # When messages run, fail and are skipped
        for kind in ["ok", "fail", "skip", "ok", "skip", "fail"] * 3:
            task.send(kind)
        broker.join(task.queue_name)
        worker.join()
        # Then each ran holding a slot, and every slot is free again
        wait_until(lambda: _free_slots(busy) == 2, timeout=5, what="every slot given back")
        assert sorted(handled) == sorted(["ok", "fail", "ok", "fail"] * 3)
    finally:
        worker.stop()


def test_a_worker_of_few_threads_is_not_gated() -> None:
    # Given a gate from 64 threads
    busy = BusyThreads(1)
    broker = StubBroker(middleware=[BusyThreadsGate(busy, from_threads=64)])
    broker.emit_after("process_boot")
    # When a worker of 8 threads boots
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=50)
    worker.start()
    try:
        # Then two threads can both be busy with the one slot
        with busy.held():
            entered = threading.Event()

            def other() -> None:
                with busy.held():
                    entered.set()

            threading.Thread(target=other).start()
            assert entered.wait(5)
    finally:
        worker.stop()
    # And a worker of 64 threads is gated again
    worker = dramatiq.Worker(broker, worker_threads=64, worker_timeout=50)
    worker.start()
    try:
        assert busy.gating
    finally:
        worker.stop()
