"""Integration fixtures: a real ``dramatiq actors`` worker process, real Redis, SQLite and PostgreSQL,
and a loopback server that speaks OpenRouter's wire protocol."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import actors
from actors import runtime
from actors.wiring import actor_options, build_runtime
from repositories.store import Job, JobStatus, JobStore
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
from tests.loopback.openrouter import OpenRouterServer

__all__ = ["PROJECT_ROOT", "READY_LINE", "Stack", "WorkerProcess", "WorkerSlot", "params", "wait_until"]


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

    def wait_for_status(self, job_id: str, *statuses: JobStatus, timeout: float = 20.0) -> Job:
        """Wait until the job reaches one of ``statuses`` (any final status when none are given)."""
        job: Job = wait_for_job_status(self.store, job_id, *statuses, timeout=timeout)
        return job

    def wait_until_no_message_for(self, job_id: str, *, timeout: float = 20.0) -> None:
        """Wait until no message about ``job_id`` is queued, delayed or unacked in Redis (dead letters are done)."""
        wait_until_no_message_for(actors.broker.client, job_id, timeout=timeout)

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
            actors.broker.client.flushdb()
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
        return WorkerProcess({**self.env, **env}, self.worker.log_path.with_name(f"{name}.log"))


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
        """Stop the session stack's worker (if any) for the duration, then restore it and its store."""
        holder = self.holder
        if holder is None:
            yield
            return
        holder.worker.stop()
        try:
            yield
        finally:
            actors.broker.client.flushdb()
            settings = Settings(database_url=holder.database_url)
            runtime.configure(lambda: build_runtime(settings), actor_options(settings))
            holder.store = runtime.current().store
            holder.worker.start()


@pytest.fixture(scope="session")
def worker_slot() -> WorkerSlot:
    """The one-worker-setup-at-a-time rule of the integration tests."""
    return WorkerSlot()


@pytest.fixture(scope="session")
def openrouter() -> Iterator[OpenRouterServer]:
    """The loopback OpenRouter server for the whole session."""
    with OpenRouterServer() as server:
        yield server


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def stack(
    request: pytest.FixtureRequest,
    openrouter: OpenRouterServer,
    tmp_path_factory: pytest.TempPathFactory,
    worker_slot: WorkerSlot,
) -> Iterator[Stack]:
    """A worker process with the store on SQLite, then on PostgreSQL; the test process shares the store."""
    backend = request.param
    database_url = database_url_for(request, backend)
    actors.broker.client.flushdb()
    settings = Settings(database_url=database_url)
    runtime.configure(lambda: build_runtime(settings), actor_options(settings))
    store = runtime.current().store
    env = worker_env(database_url, openrouter)
    worker = WorkerProcess(env, tmp_path_factory.mktemp(f"worker-{backend}") / "worker.log").start()
    running = Stack(backend, database_url, store, openrouter, worker, env)
    worker_slot.holder = running
    yield running
    worker_slot.holder = None
    worker.stop()
    actors.broker.client.flushdb()
    store.engine.dispose()
