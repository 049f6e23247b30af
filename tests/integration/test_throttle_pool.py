"""Issue 14, defect A: the per-user limit holds when the throttle's Redis pool runs out, and fails closed.

A thread that finds every pooled connection busy waits for one (``BlockingConnectionPool``) and gives up
after the pool's timeout. A job whose slot could not be taken then goes back to the queue after a delay
(no retry spent) instead of running without a slot; a slot whose release failed is released as soon as
Redis answers again instead of staying taken until its lease expires. Real Redis, Dramatiq's StubBroker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
import redis
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import CurrentMessage, Retries

from actors.wiring import redis_client
from admission.keys import job_key
from admission.leases import RedisLeaseStore
from admission.limits import ConcurrencyLimit
from admission.user_admission import UserAdmission
from middleware.throttle import UserThrottle
from settings import Settings
from tests.conftest import TEST_REDIS_URL, unique
from tests.harness import wait_until


class Setup:
    """A throttle on a Redis pool of one connection, a broker, and a worker; the test can hold the connection."""

    def __init__(self) -> None:
        self.pool = redis.BlockingConnectionPool.from_url(TEST_REDIS_URL, max_connections=1, timeout=0.2)
        self.client = redis.Redis(connection_pool=self.pool)
        self.namespace = unique("throttle-pool")
        self.admission = UserAdmission(
            leases=RedisLeaseStore(self.client, namespace=self.namespace),
            key_of=job_key,
            lease_ms=30_000,
            sweep_interval_ms=100,
            backend_down_delay_ms=200,
        )
        self.broker = StubBroker(
            middleware=[
                UserThrottle(self.admission),
                CurrentMessage(),
                Retries(max_retries=3, min_backoff=10, max_backoff=50),
            ]
        )
        self.broker.emit_after("process_boot")
        self.runs: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.worker: dramatiq.Worker | None = None

    def start(self) -> None:
        self.worker = dramatiq.Worker(self.broker, worker_threads=4, worker_timeout=50)
        self.worker.start()

    def lease_count(self, key: str) -> int:
        checker = redis.Redis.from_url(TEST_REDIS_URL)
        try:
            return int(checker.zcard(f"{self.namespace}:leases:{key}"))
        finally:
            checker.close()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.broker.close()
        self.pool.disconnect()


@pytest.fixture
def setup() -> Iterator[Setup]:
    running = Setup()
    yield running
    running.close()


def _record_run(setup: Setup, job: str) -> None:
    message = CurrentMessage.get_current_message()
    assert message is not None
    with setup.lock:
        setup.runs.append((job, int(message.options.get("retries", 0))))


def test_a_job_never_runs_without_a_slot_when_the_pool_is_exhausted(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    def work(job: str, user_id: str) -> None:
        _record_run(setup, job)

    actor = dramatiq.actor(broker=setup.broker, actor_name="work", user_limit=ConcurrencyLimit(1), max_retries=3)(work)
    # Given every connection of the throttle's pool busy
    held = setup.pool.get_connection()  # type: ignore[no-untyped-call]
    actor.send("j1", "u1")
    with caplog.at_level(logging.WARNING, logger="admission.user_admission"):
        setup.start()
        # When the worker tries to take the job's slot (or, wrongly, runs the job without one)
        wait_until(
            lambda: setup.runs or "throttle backend unreachable" in caplog.text,
            timeout=10,
            what="the worker to try the job",
        )
        # Then the job did not run, and the outage is logged once however often it is tried
        assert setup.runs == []
        assert caplog.text.count("throttle backend unreachable") == 1
    # And once a connection is free, the job runs once, with no retry spent
    setup.pool.release(held)  # type: ignore[no-untyped-call]
    wait_until(lambda: setup.runs, timeout=10, what="the job to run")
    setup.broker.join(actor.queue_name, timeout=10_000)
    assert setup.runs == [("j1", 0)]


def test_a_slot_whose_release_failed_is_released_once_redis_answers(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    held: list[Any] = []

    def work(job: str, user_id: str) -> None:
        _record_run(setup, job)
        # The job ends while every connection of the throttle's pool is busy: its release cannot get one.
        held.append(setup.pool.get_connection())  # type: ignore[no-untyped-call]

    actor = dramatiq.actor(broker=setup.broker, actor_name="work", user_limit=ConcurrencyLimit(1), max_retries=3)(work)
    with caplog.at_level(logging.WARNING, logger="admission.user_admission"):
        actor.send("j1", "u1")
        setup.start()
        wait_until(lambda: "while releasing a slot" in caplog.text, timeout=10, what="the release to fail")
    assert setup.lease_count("work:u1") == 1
    # When Redis can be reached again
    setup.pool.release(held.pop())  # type: ignore[no-untyped-call]
    # Then the slot is released within seconds, not when its 30 s lease expires
    wait_until(lambda: setup.lease_count("work:u1") == 0, timeout=5, what="the slot to be released")


def test_the_service_builds_every_redis_client_with_a_blocking_pool_and_timeouts() -> None:
    client = redis_client(Settings(redis_url=TEST_REDIS_URL, redis_socket_timeout_s=1.5, redis_max_connections=7))
    pool = client.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool)
    assert pool.max_connections == 7
    assert pool.timeout == 1.5
    assert pool.connection_kwargs["socket_timeout"] == 1.5
    assert pool.connection_kwargs["socket_connect_timeout"] == 1.5
    client.close()
