"""``WorkerTuning`` tunes the garbage collector of a booted worker process, and leaves it alone when told to."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from dramatiq.brokers.stub import StubBroker

from middleware.worker_tuning import WorkerTuning


@pytest.fixture
def restored_gc() -> Iterator[tuple[int, int, int]]:
    """This process's collector settings, put back after the test (it changes them as a worker would)."""
    before = gc.get_threshold()
    gc.unfreeze()
    try:
        yield before
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_booted_worker_process_freezes_its_boot_objects_and_collects_young_objects_less_often(
    restored_gc: tuple[int, int, int],
) -> None:
    # When a worker process has booted
    WorkerTuning(gc_young_threshold=10_000).after_process_boot(StubBroker())
    # Then what boot built is out of every later collection, and the youngest generation waits longer
    assert gc.get_freeze_count() > 1_000
    assert gc.get_threshold() == (10_000, restored_gc[1], restored_gc[2])


def test_the_collector_is_left_alone_without_a_threshold(restored_gc: tuple[int, int, int]) -> None:
    WorkerTuning(gc_young_threshold=None).after_process_boot(StubBroker())
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == restored_gc
