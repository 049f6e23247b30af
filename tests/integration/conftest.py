"""Integration fixtures: a real ``dramatiq actors`` worker process, real Redis, SQLite and PostgreSQL,
and a loopback server that speaks OpenRouter's wire protocol.

The behaviour tests of ``BOTH_BROKERS`` (retries, throttle, cancel, worker kill, shutdown hand-back) also
run with RabbitMQ as the broker (``BROKER_URL``), on PostgreSQL, in a virtual host of their own."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine

import actors
from actors.queue import JobQueue, current
from brokers.rabbitmq import is_rabbitmq
from repositories.migrations import upgrade_database
from repositories.store import Job, JobStatus, JobStore, create_store_engine
from settings import Settings
from tests.conftest import database_url_for
from tests.harness import (
    PROJECT_ROOT,
    READY_LINE,
    WorkerProcess,
    wait_for_job_status,
    wait_until,
    wait_until_no_message_for,
)
from tests.integration.message_ledger import wait_until_no_ledgered_message_for
from tests.integration.rabbitmq import own_vhost, rabbitmq_queue_in_tests
from tests.loopback.openrouter import OpenRouterServer

__all__ = ["PROJECT_ROOT", "READY_LINE", "Stack", "WorkerProcess", "WorkerSlot", "params", "wait_until"]


@pytest.fixture(scope="session", autouse=True)
def tier_services(services: None) -> None:
    """Every test of this tier has real Redis and PostgreSQL."""


def params(key: str, **extra: Any) -> dict[str, Any]:
    """Generation params whose prompt routes the request to ``key``'s scripted replies on the loopback server."""
    return {"model": "test/model", "messages": [{"role": "user", "content": f"Say hello [[{key}]]"}], **extra}


@dataclass
class Stack:
    """A running stack: the store the worker writes to, the provider server, the worker, its settings."""

    backend: str
    database_url: str
    store: JobStore
    server: OpenRouterServer
    worker: WorkerProcess
    env: dict[str, str]
    queue: JobQueue
    broker: str = "redis"
    """``redis`` or ``rabbitmq``: the message broker (throttle, lanes and signals are on Redis either way)."""

    def wait_for_status(self, job_id: str, *statuses: JobStatus, timeout: float = 20.0) -> Job:
        """Wait until the job reaches one of ``statuses`` (any final status when none are given)."""
        job: Job = wait_for_job_status(self.store, job_id, *statuses, timeout=timeout)
        return job

    def wait_until_no_message_for(self, job_id: str, *, timeout: float = 20.0) -> None:
        """Wait until no message about ``job_id`` is queued, delayed or unacked (dead letters are done)."""
        if self.broker == "rabbitmq":
            wait_until_no_ledgered_message_for(current().broker.client, job_id, timeout=timeout)
        else:
            wait_until_no_message_for(current().broker.client, job_id, timeout=timeout)

    @contextlib.contextmanager
    def other_workers(
        self, count: int, name: str, *, fresh_queues: bool = False, **env: str
    ) -> Iterator[list[WorkerProcess]]:
        """Replace the session worker with ``count`` workers started with extra environment, then restore it.

        With ``fresh_queues`` the Redis database is emptied first, so that no message left by an earlier
        test (a delayed retry, say) reaches these workers: for tests that count what the workers did.
        """
        self.worker.stop()
        if fresh_queues:
            flush_broker()
        workers: list[WorkerProcess] = []
        try:
            for index in range(count):
                workers.append(self.new_worker(f"{name}-{self.backend}-{index}", **env).start())
            yield workers
        finally:
            for worker in workers:
                worker.stop()
            self.worker.start()

    def new_worker(self, name: str, **env: str) -> WorkerProcess:
        """Another worker on the same stack (not started), with extra environment."""
        return WorkerProcess(
            {**self.env, **env}, self.worker.log_path.with_name(f"{name}.log"), actors_module=self.worker.actors_module
        )


def flush_broker() -> None:
    """Drop every message (and the throttle's, lanes' and ledger's state in Redis) of the test broker."""
    broker = current().broker
    broker.client.flushdb()
    if is_rabbitmq(broker):
        broker.flush_all()


def worker_env(database_url: str, server: OpenRouterServer, **extra: str) -> dict[str, str]:
    """The environment of a worker process under test."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "OPENROUTER_BASE_URL": server.base_url,
        "PROGRESS_INTERVAL_MS": "200",
        "BROKER_HEARTBEAT_TIMEOUT_MS": "5000",
        "JOB_LEASE_S": "10",
        "SHUTDOWN_GRACE_S": "2",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    env.update(extra)
    return env


class WorkerSlot:
    """The test Redis queues are consumed by one worker setup at a time: whoever needs them pauses the holder."""

    def __init__(self) -> None:
        self.holder: Stack | None = None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Stop the session stack's worker (if any) for the duration, then restore it and bind its queue again."""
        holder = self.holder
        if holder is None:
            yield
            return
        holder.worker.stop()
        # Whoever needs the queues expects the Redis broker the test process imported.
        rabbitmq = is_rabbitmq(holder.queue.broker)
        if rabbitmq:
            actors.default_queue.bind()
        try:
            yield
        finally:
            flush_broker()
            holder.queue.bind()
            if rabbitmq:
                flush_broker()
            holder.worker.start()


@pytest.fixture
def pooled_engine(postgres_database: str) -> Iterator[Engine]:
    """A store engine on PostgreSQL (migrated) whose calls, one after the other, all reuse one pooled connection."""
    created = create_store_engine(postgres_database, pool_size=1)
    upgrade_database(created)
    yield created
    created.dispose()


@pytest.fixture(scope="session")
def worker_slot() -> WorkerSlot:
    """The one-worker-setup-at-a-time rule of the integration tests."""
    return WorkerSlot()


@pytest.fixture(scope="session")
def openrouter() -> Iterator[OpenRouterServer]:
    """The loopback OpenRouter server for the whole session."""
    with OpenRouterServer() as server:
        yield server


#: Modules whose tests also run with RabbitMQ as the broker (``pytest_generate_tests``).
BOTH_BROKERS = {"test_retries", "test_throttle", "test_cancellation", "test_worker_crash"}
#: Stack parameters: a store on the Redis broker, or ``rabbitmq-<store>``.
REDIS_STACKS = ["sqlite", "postgresql"]
BOTH_BROKER_STACKS = [*REDIS_STACKS, "rabbitmq-postgresql"]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the ``BOTH_BROKERS`` modules' stack tests on RabbitMQ too (PostgreSQL only: the production pair).

    As a mark, added before pytest reads the marks, so that it replaces the fixture's own params."""
    if "stack" in metafunc.fixturenames and metafunc.module.__name__.rsplit(".", 1)[-1] in BOTH_BROKERS:
        metafunc.definition.add_marker(
            pytest.mark.parametrize("stack", BOTH_BROKER_STACKS, indirect=True, scope="session")
        )


@pytest.fixture(scope="session", params=REDIS_STACKS)
def stack(
    request: pytest.FixtureRequest,
    openrouter: OpenRouterServer,
    tmp_path_factory: pytest.TempPathFactory,
    worker_slot: WorkerSlot,
) -> Iterator[Stack]:
    """A worker process with the store on SQLite, then on PostgreSQL (and for ``BOTH_BROKERS``, RabbitMQ as the
    broker with PostgreSQL); the test process shares the store and the broker."""
    broker, _, backend = str(request.param).rpartition("-")
    with contextlib.ExitStack() as resources:
        extra: dict[str, str] = {}
        settings = Settings(database_url=database_url_for(request, backend))
        actors_module = "actors"
        if broker == "rabbitmq":
            extra["BROKER_URL"] = resources.enter_context(own_vhost())
            settings = Settings(database_url=settings.database_url, broker_url=extra["BROKER_URL"])
            queue = resources.enter_context(rabbitmq_queue_in_tests(settings))
            actors_module = "tests.integration.ledger_actors"
        else:
            queue = JobQueue(settings)
            resources.enter_context(queue.bound())
            resources.callback(queue.close)
        flush_broker()
        store = queue.store
        env = worker_env(settings.database_url, openrouter, **extra)
        log_path = tmp_path_factory.mktemp(f"worker-{request.param}") / "worker.log"
        worker = WorkerProcess(env, log_path, actors_module=actors_module).start()
        running = Stack(
            backend, settings.database_url, store, openrouter, worker, env, queue=queue, broker=broker or "redis"
        )
        worker_slot.holder = running
        yield running
        worker_slot.holder = None
        worker.stop()
        flush_broker()
