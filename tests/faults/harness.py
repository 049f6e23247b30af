"""What the durability fault tests share: a Redis server of their own, a worker stack on it, invariant checks.

Each test starts its own ``redis-server`` on a free port (with or without AOF) that it may restart at will,
a ``TcpProxy`` in front of the machine's PostgreSQL that it may switch off, its own loopback provider, and
real ``dramatiq actors`` workers and a real ``scheduler.py`` pointed at those. The bounds of the reconciler
(sweep interval, job lease, broker heartbeat timeout, throttle lease) are set small so the suite stays fast.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from repositories.store import FINAL_STATUSES, Job, JobKind, JobStatus, JobStore, utcnow
from tests.harness import PROJECT_ROOT, WorkerProcess, wait_until
from tests.loopback.openrouter import OpenRouterServer, RecordedRequest

#: Small bounds so a fault is recovered from in seconds (the defaults are minutes).
FAST_BOUNDS = {
    "PROGRESS_INTERVAL_MS": "200",
    "JOB_LEASE_S": "5",
    "BROKER_HEARTBEAT_TIMEOUT_MS": "5000",
    "THROTTLE_LEASE_S": "3",
    "RECONCILE_INTERVAL_S": "1",
    "RECONCILE_PENDING_AFTER_S": "4",
    "RETRY_MIN_BACKOFF_MS": "200",
    "RETRY_MAX_BACKOFF_MS": "1000",
    "SHUTDOWN_GRACE_S": "1",
    "CANCEL_SIGNALS": "false",
    "LIVE_TEXT_ENABLED": "false",
}


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of the test's own on a free port; ``restart`` keeps the port (and, with AOF, the data)."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.directory = directory
        self.appendonly = appendonly
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The ``redis://`` URL of database 0."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        where = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            [server, *where, "--save", "", *persistence],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        wait_until(lambda: _pings(client), timeout=10, interval=0.02, what="redis-server to answer")
        client.close()
        return self

    def stop(self) -> None:
        """SIGTERM (a clean shutdown: with AOF everything written is kept) and wait."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None

    def restart(self, *, down_s: float = 1.0) -> None:
        """Stop the server, stay down ``down_s`` seconds (clients see connection errors), start it again."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def client(self) -> redis.Redis:
        """A client of database 0."""
        return redis.Redis.from_url(self.url)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def params(key: str) -> dict[str, Any]:
    """Generation params routed to ``key``'s scripted replies on the loopback server."""
    return {"model": "test/model", "messages": [{"role": "user", "content": f"Say it [[{key}]]"}]}


@dataclass
class FaultStack:
    """The parts of one fault test: Redis, the store (direct and through the proxy), the provider, processes."""

    redis_server: RedisServer
    store: JobStore
    database_url: str
    worker_database_url: str
    provider: OpenRouterServer
    log_dir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: list[WorkerProcess] = field(default_factory=list)
    schedulers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _broker: RedisBroker | None = None

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a worker or scheduler of this stack."""
        return {
            **os.environ,
            "REDIS_URL": self.redis_server.url,
            "DATABASE_URL": self.worker_database_url,
            "OPENROUTER_BASE_URL": self.provider.base_url,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(PROJECT_ROOT),
            **FAST_BOUNDS,
            **self.extra_env,
            **extra,
        }

    def worker(self, name: str, *, threads: int = 8, **extra: str) -> WorkerProcess:
        """Start a ``dramatiq actors`` worker of this stack and wait until it is ready."""
        worker = WorkerProcess(self.env(**extra), self.log_dir / f"{name}.log", threads=threads)
        self.processes.append(worker)
        return worker.start()

    def scheduler(self, **extra: str) -> subprocess.Popen[bytes]:
        """Start ``scheduler.py`` (the reconciler) of this stack."""
        log = (self.log_dir / f"scheduler-{len(self.schedulers)}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "scheduler.py"],
            cwd=PROJECT_ROOT,
            env=self.env(**extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.schedulers.append(process)
        return process

    @property
    def broker(self) -> RedisBroker:
        """A plain Redis broker on this stack's Redis, for sending messages as web code would."""
        if self._broker is None:
            self._broker = RedisBroker(url=self.redis_server.url)  # type: ignore[no-untyped-call]
        return self._broker

    def submit(self, key: str, user_id: str) -> str:
        """Enqueue a generation as ``enqueue_generation`` does: the row first, then the message, then mark it."""
        self.store.create(job_id=key, user_id=user_id, kind=JobKind.GENERATE, request=params(key))
        self.send(key, user_id)
        self.store.mark_enqueued(key)
        return key

    def send(self, key: str, user_id: str) -> None:
        """Send a generate message for job ``key`` straight to the broker."""
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name="llm_generate",
            actor_name="generate_llm_response",
            args=(),
            kwargs={"job_id": key, "user_id": user_id, "params": params(key)},
            options={},
        )
        self.broker.enqueue(message)

    def wait_all_final(self, job_ids: list[str], *, timeout: float) -> list[Job]:
        """Wait until every job is final; return them."""

        def final() -> list[Job] | None:
            jobs = [self.store.get(job_id) for job_id in job_ids]
            if all(job is not None and job.status in FINAL_STATUSES for job in jobs):
                return [job for job in jobs if job is not None]
            return None

        def describe() -> str:
            states = [(job_id, getattr(self.store.get(job_id), "status", None)) for job_id in job_ids]
            return f"every job to be final; now {states}"

        try:
            result: list[Job] = wait_until(final, timeout=timeout, interval=0.1, what="every job to be final")
        except AssertionError:
            raise AssertionError(describe()) from None
        return result

    def close(self) -> None:
        """Stop every process of the stack and the Redis server."""
        for scheduler in self.schedulers:
            if scheduler.poll() is None:
                os.killpg(scheduler.pid, signal.SIGKILL)
                scheduler.wait(timeout=10)
        for worker in self.processes:
            with contextlib.suppress(ProcessLookupError):
                if worker.process is not None:
                    os.killpg(worker.process.pid, signal.SIGCONT)
            worker.kill()
        if self._broker is not None:
            self._broker.client.connection_pool.disconnect()
        self.redis_server.stop()


def assert_consistent(job: Job, text: str, *, provider_calls: int, provider: OpenRouterServer) -> None:
    """A completed job holds exactly one attempt's text and made the expected number of provider calls."""
    assert job.status is JobStatus.COMPLETED, (job.job_id, job.status, job.error)
    assert job.content == text, (job.job_id, job.content)
    assert job.response is not None
    assert job.response["content"] == text
    assert job.finished_at is not None
    assert len(provider.requests_for(job.job_id)) == provider_calls, job.job_id


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, step in events:
        open_now += step
        peak = max(peak, open_now)
    return peak


def stream_intervals(requests: list[RecordedRequest]) -> list[tuple[float, float]]:
    """When each provider request was open (``received_at`` to ``closed_at``, or now)."""
    now = time.time()
    return [(request.received_at, request.closed_at or now) for request in requests]


class LeaseSampler:
    """Samples, every few milliseconds, how many live throttle leases a user holds in Redis; keeps the peak."""

    def __init__(self, client: redis.Redis, actor: str, user_id: str) -> None:
        self.client = client
        self.key = f"llm-throttle:leases:{actor}:{user_id}"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LeaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            with contextlib.suppress(redis.RedisError):
                live = int(self.client.zcount(self.key, int(time.time() * 1000), "+inf"))
                self.peak = max(self.peak, live)


def age_s(moment: Any) -> float:
    """Seconds since ``moment`` (an aware datetime)."""
    return float((utcnow() - moment).total_seconds())


@contextlib.contextmanager
def stopped(worker: WorkerProcess) -> Iterator[None]:
    """SIGSTOP every process of ``worker`` for the duration, then SIGCONT."""
    assert worker.process is not None
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)
