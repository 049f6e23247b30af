"""The throttle middleware and its limiters, in memory: Dramatiq's StubBroker and the memory lease store."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries
from dramatiq.rate_limits.backends import StubBackend

from middleware.limiters import (
    BucketLimit,
    ConcurrencyLimit,
    LeaseStore,
    MemoryLeaseStore,
    StartRateGate,
    UserLoad,
    WindowLimit,
    split_entry,
)
from middleware.throttle import UserThrottle, parked_entry, user_of


def stub_backend() -> StubBackend:
    """Dramatiq's in-memory rate-limit backend."""
    return StubBackend()  # type: ignore[no-untyped-call]


class Tracker:
    """Counts how many jobs of each user run at once, and how often each job ran."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.runs: Counter[str] = Counter()
        self.finished_order: list[str] = []

    def enter(self, user_id: str, job: str) -> None:
        with self.lock:
            self.running[user_id] += 1
            self.peak[user_id] = max(self.peak[user_id], self.running[user_id])
            self.runs[job] += 1

    def leave(self, user_id: str, job: str) -> None:
        with self.lock:
            self.running[user_id] -= 1
            self.finished_order.append(job)


@pytest.fixture
def stub() -> Iterator[tuple[StubBroker, UserThrottle, Tracker]]:
    leases = MemoryLeaseStore()
    throttle = UserThrottle(leases=leases, gate=StartRateGate(stub_backend()), lease_ms=5_000, sweep_interval_ms=100)
    broker = StubBroker(middleware=[throttle, Retries(max_retries=3, min_backoff=10, max_backoff=50)])
    broker.emit_after("process_boot")
    yield broker, throttle, Tracker()
    broker.close()


def _work_actor(
    broker: StubBroker, tracker: Tracker, limit: object, seconds: float
) -> dramatiq.Actor[[str, str], None]:
    def work(job: str, user_id: str) -> None:
        tracker.enter(user_id, job)
        time.sleep(seconds)  # the job's own duration, not a wait for a condition
        tracker.leave(user_id, job)

    decorate = dramatiq.actor(broker=broker, actor_name="work", user_limit=limit, max_retries=3)
    return decorate(work)


def _run(broker: StubBroker, *, threads: int = 8) -> None:
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=50)
    worker.start()
    try:
        broker.join("default", timeout=20_000)
        worker.join()
    finally:
        worker.stop()


def test_a_user_never_runs_more_than_the_limit_and_every_job_runs_once(
    stub: tuple[StubBroker, UserThrottle, Tracker],
) -> None:
    broker, _throttle, tracker = stub
    actor = _work_actor(broker, tracker, ConcurrencyLimit(2), 0.05)
    for index in range(10):
        actor.send(f"heavy-{index}", "heavy")
    actor.send("light-0", "light")
    _run(broker)
    assert tracker.peak["heavy"] == 2
    assert set(tracker.runs.values()) == {1}
    assert len(tracker.runs) == 11
    assert broker.dead_letters == []


def test_a_light_users_job_does_not_wait_behind_a_heavy_backlog(
    stub: tuple[StubBroker, UserThrottle, Tracker],
) -> None:
    broker, _throttle, tracker = stub
    actor = _work_actor(broker, tracker, ConcurrencyLimit(1), 0.05)
    for index in range(8):
        actor.send(f"heavy-{index}", "heavy")
    actor.send("light-0", "light")
    _run(broker)
    assert tracker.finished_order.index("light-0") < 3


def test_messages_without_a_user_or_limit_pass_untouched(stub: tuple[StubBroker, UserThrottle, Tracker]) -> None:
    broker, _throttle, tracker = stub
    actor = _work_actor(broker, tracker, None, 0.0)
    for index in range(3):
        actor.send(f"job-{index}", "same-user")
    _run(broker)
    assert sum(tracker.runs.values()) == 3


def test_user_id_is_read_from_keywords_or_the_second_argument() -> None:
    class FakeMessage:
        def __init__(self, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            self.args, self.kwargs = args, kwargs

    assert user_of(FakeMessage((), {"user_id": "u1"})) == "u1"
    assert user_of(FakeMessage(("job", "u2"), {})) == "u2"
    assert user_of(FakeMessage((), {"user_id": 7})) is None
    assert user_of(FakeMessage((), {})) is None


def test_a_released_slot_goes_to_the_oldest_parked_message() -> None:
    store = MemoryLeaseStore()
    assert store.acquire("a:u", "m1", limit=1, lease_ms=10_000, parked_entry=b"m1\nbody1")
    assert not store.acquire("a:u", "m2", limit=1, lease_ms=10_000, parked_entry=b"m2\nbody2")
    assert not store.acquire("a:u", "m3", limit=1, lease_ms=10_000, parked_entry=b"m3\nbody3")
    assert store.loads() == [UserLoad("a", "u", running=1, waiting=2)]
    handed = store.release("a:u", "m1", limit=1, lease_ms=10_000)
    assert [split_entry(entry) for entry in handed] == [("m2", b"body2")]
    # the handed-off message already holds the slot when it comes back
    assert store.acquire("a:u", "m2", limit=1, lease_ms=10_000, parked_entry=None)
    assert not store.acquire("a:u", "m9", limit=1, lease_ms=10_000, parked_entry=None)


def test_a_message_sent_behind_a_backlog_is_parked_in_line_and_without_one_nothing_is_written(
    stub: tuple[StubBroker, UserThrottle, Tracker],
) -> None:
    broker, throttle, actor, store = _limited_to_one(stub)
    # Given no backlog: the sender is told to enqueue, and nothing is parked
    assert not throttle.park_behind_backlog(broker, actor.message("job-0", "u"))
    assert store.loads() == []
    # Given one running job of the user and one parked by a worker
    assert store.acquire("work:u", "m1", limit=1, lease_ms=10_000, parked_entry=None)
    assert not store.acquire("work:u", "m2", limit=1, lease_ms=10_000, parked_entry=b"m2\nbody2")
    # When the sender sends another job of that user
    sent = actor.message("job-3", "u")
    assert throttle.park_behind_backlog(broker, sent)
    # Then it waits behind the parked one, and the slot reaches it second, as the same message
    assert store.loads() == [UserLoad("work", "u", running=1, waiting=2)]
    assert [split_entry(e)[0] for e in store.release("work:u", "m1", limit=1, lease_ms=10_000)] == ["m2"]
    handed = store.release("work:u", "m2", limit=1, lease_ms=10_000)
    assert [split_entry(e) for e in handed] == [(sent.message_id, sent.encode())]
    # And another user's message, or one of an actor without a limit, is never parked by the sender
    assert not throttle.park_behind_backlog(broker, actor.message("job-4", "someone-else"))
    unlimited = _free_actor(broker)
    assert not throttle.park_behind_backlog(broker, unlimited.message("job-5", "u"))


def test_a_cancelled_job_is_taken_out_of_the_line_and_the_slot_goes_to_the_next(
    stub: tuple[StubBroker, UserThrottle, Tracker],
) -> None:
    broker, throttle, actor, store = _limited_to_one(stub)
    # Given one running job and two parked behind it
    assert store.acquire("work:u", "running", limit=1, lease_ms=10_000, parked_entry=None)
    waiting = [actor.message_with_options(kwargs={"job_id": f"job-{index}", "user_id": "u"}) for index in range(2)]
    for message in waiting:
        entry = parked_entry(message)
        assert not store.acquire("work:u", message.message_id, limit=1, lease_ms=10_000, parked_entry=entry)
    # When the first waiting job is cancelled
    assert throttle.drop_parked(broker, "job-0", "u") == 1
    # Then it has left the line, and the freed slot goes to the other one
    assert store.loads() == [UserLoad("work", "u", running=1, waiting=1)]
    handed = store.release("work:u", "running", limit=1, lease_ms=10_000)
    assert [split_entry(entry)[0] for entry in handed] == [waiting[1].message_id]
    # And a job that is not parked (or another user's) drops nothing
    assert throttle.drop_parked(broker, "job-0", "u") == 0
    assert throttle.drop_parked(broker, "job-1", "someone-else") == 0


def _limited_to_one(
    stub: tuple[StubBroker, UserThrottle, Tracker],
) -> tuple[StubBroker, UserThrottle, dramatiq.Actor[[str, str], None], LeaseStore]:
    """The stub broker, its throttle, an actor limited to one job per user, and the throttle's lease store."""
    broker, throttle, tracker = stub
    return broker, throttle, _work_actor(broker, tracker, ConcurrencyLimit(1), 0.0), throttle.leases


def _free_actor(broker: StubBroker) -> dramatiq.Actor[[str, str], None]:
    def free(job: str, user_id: str) -> None:
        del job, user_id

    return dramatiq.actor(broker=broker, actor_name="free")(free)


def test_an_expired_lease_frees_its_slot_and_a_renewed_one_does_not() -> None:
    store = MemoryLeaseStore()
    assert store.acquire("a:u", "dead", limit=1, lease_ms=50, parked_entry=None)
    assert store.acquire("a:v", "alive", limit=1, lease_ms=50, parked_entry=None)
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        store.renew([("a:v", "alive")], lease_ms=50)
        time.sleep(0.01)  # a job renewing its lease periodically
    assert store.acquire("a:u", "new", limit=1, lease_ms=50, parked_entry=None)
    assert not store.acquire("a:v", "intruder", limit=1, lease_ms=50, parked_entry=None)


def test_a_window_limit_refuses_the_extra_start_with_a_delay() -> None:
    gate = StartRateGate(stub_backend())
    limit = WindowLimit(limit=2, window_s=60)
    assert gate.try_start("a:u", limit) is None
    assert gate.try_start("a:u", limit) is None
    delay = gate.try_start("a:u", limit)
    assert delay is not None
    assert delay >= 1000
    assert gate.try_start("a:other", limit) is None


def test_a_bucket_limit_refuses_until_the_next_bucket() -> None:
    gate = StartRateGate(stub_backend())
    limit = BucketLimit(limit=1, bucket_ms=60_000)
    assert gate.try_start("a:u", limit) is None
    delay = gate.try_start("a:u", limit)
    assert delay is not None
    assert 0 < delay <= 60_001


def test_window_limited_jobs_are_delayed_not_failed(stub: tuple[StubBroker, UserThrottle, Tracker]) -> None:
    broker, _throttle, tracker = stub
    actor = _work_actor(broker, tracker, BucketLimit(limit=2, bucket_ms=300), 0.0)
    for index in range(4):
        actor.send(f"job-{index}", "u")
    _run(broker)
    assert sum(tracker.runs.values()) == 4
    assert broker.dead_letters == []


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        ConcurrencyLimit(limit)
