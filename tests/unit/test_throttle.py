"""Per-user admission in memory: Dramatiq's StubBroker, the memory lease store, the throttle middleware's hooks.

The lease stores' own behaviour is the contract suite's (``tests/contract/lease_store_contract.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Retries
from dramatiq.rate_limits.backends import StubBackend

from admission.keys import JobKey, job_key
from admission.leases import MemoryLeaseStore, Parked, UserLoad
from admission.limits import (
    Admit,
    BucketLimit,
    ConcurrencyLimit,
    Decision,
    Request,
    Retry,
    StartRateGate,
    UserLimit,
    WindowLimit,
)
from admission.messages import handing_off
from admission.sending import ParkAtSend
from admission.user_admission import UserAdmission
from middleware.throttle import UserThrottle


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
        self.retries: list[int] = []
        self.finished_order: list[str] = []
        self.overall = self.overall_peak = 0

    def enter(self, user_id: str, job: str) -> None:
        message = CurrentMessage.get_current_message()
        with self.lock:
            self.running[user_id] += 1
            self.peak[user_id] = max(self.peak[user_id], self.running[user_id])
            self.overall += 1
            self.overall_peak = max(self.overall_peak, self.overall)
            self.runs[job] += 1
            self.retries.append(int(message.options.get("retries", 0)) if message is not None else -1)

    def leave(self, user_id: str, job: str) -> None:
        with self.lock:
            self.running[user_id] -= 1
            self.overall -= 1
            self.finished_order.append(job)


class ParkingStubBroker(ParkAtSend, StubBroker):
    """The stub broker with parking at send, as the service's brokers have it."""


@dataclass
class Stub:
    broker: ParkingStubBroker
    admission: UserAdmission
    leases: MemoryLeaseStore
    tracker: Tracker


def _stub(leases: Any = None, **options: Any) -> Stub:
    store = MemoryLeaseStore()
    admission = UserAdmission(
        leases=leases if leases is not None else store,
        key_of=options.pop("key_of", job_key),
        gate=StartRateGate(stub_backend()),
        lease_ms=5_000,
        sweep_interval_ms=100,
        **options,
    )
    broker = ParkingStubBroker(
        middleware=[UserThrottle(admission), CurrentMessage(), Retries(max_retries=3, min_backoff=10, max_backoff=50)]
    )
    broker.admission = admission
    broker.emit_after("process_boot")
    return Stub(broker, admission, store, Tracker())


@pytest.fixture
def stub() -> Iterator[Stub]:
    running = _stub()
    yield running
    running.broker.close()


def _work_actor(stub: Stub, limit: object, seconds: float, name: str = "work") -> dramatiq.Actor[[str, str], None]:
    tracker = stub.tracker

    def work(job: str, user_id: str) -> None:
        tracker.enter(user_id, job)
        time.sleep(seconds)  # the job's own duration, not a wait for a condition
        tracker.leave(user_id, job)

    decorate = dramatiq.actor(broker=stub.broker, actor_name=name, user_limit=limit, max_retries=3)
    return decorate(work)


def _run(broker: StubBroker, *, threads: int = 8) -> None:
    worker = dramatiq.Worker(broker, worker_threads=threads, worker_timeout=50)
    worker.start()
    try:
        broker.join("default", timeout=20_000)
        worker.join()
    finally:
        worker.stop()


def test_a_user_never_runs_more_than_the_limit_and_every_job_runs_once(stub: Stub) -> None:
    actor = _work_actor(stub, ConcurrencyLimit(2), 0.05)
    for index in range(10):
        actor.send(f"heavy-{index}", "heavy")
    actor.send("light-0", "light")
    _run(stub.broker)
    assert stub.tracker.peak["heavy"] == 2
    assert set(stub.tracker.runs.values()) == {1}
    assert len(stub.tracker.runs) == 11
    assert set(stub.tracker.retries) == {0}
    assert stub.broker.dead_letters == []


def test_a_light_users_job_does_not_wait_behind_a_heavy_backlog(stub: Stub) -> None:
    actor = _work_actor(stub, ConcurrencyLimit(1), 0.05)
    for index in range(8):
        actor.send(f"heavy-{index}", "heavy")
    actor.send("light-0", "light")
    _run(stub.broker)
    assert stub.tracker.finished_order.index("light-0") < 3


def test_messages_without_a_user_or_limit_pass_untouched(stub: Stub) -> None:
    actor = _work_actor(stub, None, 0.0)
    for index in range(3):
        actor.send(f"job-{index}", "same-user")
    _run(stub.broker)
    assert sum(stub.tracker.runs.values()) == 3


def test_the_default_key_reads_keywords_or_the_first_two_arguments() -> None:
    class FakeMessage:
        def __init__(self, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            self.args, self.kwargs = args, kwargs

    assert job_key(FakeMessage((), {"user_id": "u1", "job_id": "j1"})) == JobKey("u1", "j1")
    assert job_key(FakeMessage(("j2", "u2"), {})) == JobKey("u2", "j2")
    assert job_key(FakeMessage((), {"user_id": "u3"})) == JobKey("u3", None)
    assert job_key(FakeMessage((), {"user_id": 7})) is None
    assert job_key(FakeMessage((), {})) is None


def test_the_key_function_given_decides_whose_limit_a_message_counts_against() -> None:
    # Given a key function that limits every message of the actor as one tenant, whatever its user
    stub = _stub(key_of=lambda message: JobKey("tenant", message.kwargs["job"]))
    try:
        actor = _work_actor(stub, ConcurrencyLimit(1), 0.02)
        for index in range(4):
            actor.send_with_options(kwargs={"job": f"j{index}", "user_id": f"user-{index}"})
        _run(stub.broker)
    finally:
        stub.broker.close()
    # Then the four users' jobs ran one at a time, each once
    assert stub.tracker.overall_peak == 1
    assert stub.tracker.runs == Counter({f"j{index}": 1 for index in range(4)})


def test_a_message_sent_behind_a_backlog_is_parked_in_line_and_without_one_nothing_is_written(stub: Stub) -> None:
    broker, admission, store = stub.broker, stub.admission, stub.leases
    actor = _work_actor(stub, ConcurrencyLimit(1), 0.0)
    # Given no backlog: the sender is told to enqueue, and nothing is parked
    assert not admission.park_behind_backlog(broker, actor.message("job-0", "u"))
    assert store.loads() == []
    # Given one running job of the user and one parked by a worker
    assert store.acquire("work:u", "m1", limit=1, lease_ms=10_000)
    assert not store.acquire("work:u", "m2", limit=1, lease_ms=10_000, park=Parked("job-2", b"body2"))
    # When the sender sends another job of that user
    sent = actor.message("job-3", "u")
    assert admission.park_behind_backlog(broker, sent)
    # Then it waits behind the parked one, keyed by its job id, and the slot reaches it second, as the same message
    assert store.loads() == [UserLoad("work", "u", running=1, waiting=2)]
    assert [e.id for e in store.release("work:u", "m1", limit=1, lease_ms=10_000)] == ["job-2"]
    assert store.release("work:u", "job-2", limit=1, lease_ms=10_000) == [Parked("job-3", sent.encode())]
    # And another user's message, or one of an actor without a limit, is never parked by the sender
    assert not admission.park_behind_backlog(broker, actor.message("job-4", "someone-else"))
    unlimited = _work_actor(stub, None, 0.0, name="free")
    assert not admission.park_behind_backlog(broker, unlimited.message("job-5", "u"))


def test_actor_send_parks_behind_a_backlog_as_the_api_does_but_a_handoff_never_does(stub: Stub) -> None:
    broker, store = stub.broker, stub.leases
    actor = _work_actor(stub, ConcurrencyLimit(1), 0.0)
    assert store.acquire("work:u", "running", limit=1, lease_ms=10_000)
    assert not store.acquire("work:u", "m2", limit=1, lease_ms=10_000, park=Parked("job-2", b"body2"))
    # When web code sends with actor.send while the user has a line
    sent = actor.send_with_options(kwargs={"job": "job-3", "user_id": "u"})
    actor.send_with_options(kwargs={"job": "job-4", "user_id": "other"})
    # Then the user's message joined the line instead of the queue (under its message id: it has no job_id)
    assert store.parked("work:u") == [Parked("job-2", b"body2"), Parked(sent.message_id, sent.encode())]
    # and the other user's was enqueued
    assert broker.queues["default"].qsize() == 1
    # And a message enqueued while handing a slot off, or with a delay, is enqueued whatever the line
    with handing_off():
        actor.send_with_options(kwargs={"job": "job-5", "user_id": "u"})
    actor.send_with_options(kwargs={"job": "job-6", "user_id": "u"}, delay=10)
    assert broker.queues["default"].qsize() == 2
    assert len(store.parked("work:u")) == 2


def test_a_cancelled_job_is_taken_out_of_the_line_in_one_call_and_the_slot_goes_to_the_next(stub: Stub) -> None:
    store, admission = stub.leases, stub.admission
    # Given one running job and two parked behind it
    assert store.acquire("work:u", "running", limit=1, lease_ms=10_000)
    for index in range(2):
        assert not store.acquire("work:u", f"h{index}", limit=1, lease_ms=10_000, park=Parked(f"job-{index}", b"b"))
    # When the first waiting job is cancelled
    assert admission.take_out("job-0")
    # Then it has left the line, and the freed slot goes to the other one
    assert store.loads() == [UserLoad("work", "u", running=1, waiting=1)]
    assert [e.id for e in store.release("work:u", "running", limit=1, lease_ms=10_000)] == ["job-1"]
    # And a job that is not parked takes nothing out
    assert not admission.take_out("job-0")
    assert not admission.take_out("job-1")


def test_window_limited_jobs_are_delayed_not_failed(stub: Stub) -> None:
    actor = _work_actor(stub, BucketLimit(limit=2, bucket_ms=300), 0.0)
    for index in range(4):
        actor.send(f"job-{index}", "u")
    _run(stub.broker)
    assert sum(stub.tracker.runs.values()) == 4
    assert set(stub.tracker.retries) == {0}
    assert stub.broker.dead_letters == []


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


@dataclass(frozen=True, slots=True)
class EveryOther(UserLimit):
    """A limit kind written for this test: one class, nothing else edited."""

    seen: list[str]

    def admit(self, request: Request) -> Decision:
        self.seen.append(request.entry.id)
        return Admit() if len(self.seen) % 2 else Retry(10, "every other start waits 10 ms")


def test_a_new_limit_kind_is_one_class(stub: Stub) -> None:
    seen: list[str] = []
    actor = _work_actor(stub, EveryOther(seen), 0.0)
    for index in range(3):
        actor.send(f"job-{index}", "u")
    _run(stub.broker)
    assert sum(stub.tracker.runs.values()) == 3
    assert len(seen) >= 5  # each refused start was tried again after its delay
    assert set(stub.tracker.retries) == {0}


class RefusingLeases(MemoryLeaseStore):
    """A lease store whose backend refuses connections while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.refused = 0

    def acquire(self, key: str, holder: str, **options: Any) -> bool:
        if self.down.is_set():
            self.refused += 1
            raise ConnectionRefusedError("backend down")
        return super().acquire(key, holder, **options)


def test_admission_fails_closed_without_spending_a_retry_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    leases = RefusingLeases()
    leases.down.set()
    stub = _stub(leases=leases, backend_down_delay_ms=20)
    try:
        actor = _work_actor(stub, ConcurrencyLimit(1), 0.0)
        worker = dramatiq.Worker(stub.broker, worker_threads=2, worker_timeout=20)
        with caplog.at_level(logging.INFO, logger="admission.user_admission"):
            actor.send("job-0", "u")
            worker.start()
            try:
                deadline = time.monotonic() + 10
                while leases.refused < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)  # waiting for the worker to try admission several times
                assert leases.refused >= 5
                assert stub.tracker.runs == Counter()
                leases.down.clear()
                stub.broker.join("default", timeout=10_000)
                worker.join()
            finally:
                worker.stop()
    finally:
        stub.broker.close()
    assert stub.tracker.runs == Counter({"job-0": 1})
    assert stub.tracker.retries == [0]
    assert caplog.text.count("throttle backend unreachable") == 1
    assert caplog.text.count("throttle backend answers again") == 1


def test_the_middleware_has_only_hooks() -> None:
    hooks = {name for name in vars(UserThrottle) if not name.startswith("_")}
    assert hooks == {
        "actor_options",
        "after_worker_boot",
        "before_worker_shutdown",
        "before_process_message",
        "after_process_message",
        "after_skip_message",
    }


@pytest.mark.parametrize("limit", [0, -1])
def test_a_limit_below_one_is_refused(limit: int) -> None:
    with pytest.raises(ValueError, match="limit"):
        ConcurrencyLimit(limit)
