"""Throughput of instant jobs at ``-t 8`` and the cost of one ``enqueue_generation``, against bare Dramatiq.

``--jobs`` jobs (of as many users) are queued while no worker runs, then one worker process with 8
threads drains them against an instant loopback stream (``bench.sse_server``, 3 chunks). Measured:
jobs per second (first provider request to last completion) and CPU milliseconds of the worker tree
per job (from the worker's ready line to the last completion), on SQLite and PostgreSQL, and for the
bare-Dramatiq baseline (``bench.bare_actors``) with async httpx and with sync httpx. Then the p50 and
p95 of ``enqueue_generation`` (timed over the jobs queued above) against ``actor.send`` of the same
message and a raw single-row ``INSERT`` on the same engine.

    python -m bench.throughput [--jobs 1000] [--stores sqlite,postgresql] [--threads 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cancel import percentile
from bench.scale_support import (
    BENCH_REDIS_URL,
    BROKERS,
    TreeMeter,
    bare_env,
    cpu_ms_per,
    fresh_postgres,
    message_broker,
    project_env,
)
from bench.sse_server import ProcessStreamingServer as StreamingServer

ENQUEUE_SAMPLES = 200


@dataclass
class ThroughputFigures:
    """One configuration's drain of the batch."""

    name: str
    jobs: int
    completed: int
    jobs_per_s: float
    cpu_ms_per_job: float
    enqueue_ms: list[float] = field(default_factory=list)
    send_ms: list[float] = field(default_factory=list)
    insert_ms: list[float] = field(default_factory=list)


def _flush(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


def _timed(call: Any) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def enqueue_costs(store: Any, run: str) -> tuple[list[float], list[float]]:
    """``actor.send`` and a raw ``INSERT`` on the store's engine, ``ENQUEUE_SAMPLES`` times each, in ms."""
    from sqlalchemy import text

    from actors import generate_llm_response

    send_ms = []
    for index in range(ENQUEUE_SAMPLES):
        key = f"send{index}-{run}"
        params = {"model": "bench", "messages": [{"role": "user", "content": f"go [[{key}]]"}]}
        send_ms.append(_timed(lambda k=key, p=params: generate_llm_response.send(job_id=k, user_id=f"{k}-u", params=p)))
    engine = store.engine
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE IF NOT EXISTS bench_raw_insert (id VARCHAR(64) PRIMARY KEY, body TEXT)"))
    insert = text("INSERT INTO bench_raw_insert (id, body) VALUES (:id, :body)")

    def insert_one(key: str) -> None:
        with engine.begin() as connection:
            connection.execute(insert, {"id": key, "body": '{"model": "bench"}'})

    insert_ms = [_timed(lambda index=index: insert_one(f"raw{index}-{run}")) for index in range(ENQUEUE_SAMPLES)]
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE bench_raw_insert"))
    return send_ms, insert_ms


def run_project(
    store_name: str, database_url: str, *, jobs: int, threads: int, workdir: Path, broker_env: dict[str, str]
) -> ThroughputFigures:
    """This project's worker draining ``jobs`` queued generations (with ``broker_env``: on RabbitMQ)."""
    from sqlalchemy import func, select

    from actors import enqueue_generation
    from actors.queue import JobQueue
    from repositories.store import JobRow, JobStatus
    from settings import Settings
    from tests.harness import WorkerProcess, wait_until

    _flush(BENCH_REDIS_URL)
    settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL, broker_url=broker_env.get("BROKER_URL"))
    queue = JobQueue(settings)
    queue.bind()
    store = queue.store
    run = uuid.uuid4().hex[:6]
    enqueue_ms = []
    for index in range(jobs):
        key = f"t{index}-{run}"
        params = {"model": "bench", "messages": [{"role": "user", "content": f"go [[{key}]]"}]}
        enqueue_ms.append(_timed(lambda k=key, p=params: enqueue_generation(user_id=f"{k}-u", params=p, job_id=k)))
    completed_count = select(func.count()).select_from(JobRow).where(JobRow.status == str(JobStatus.COMPLETED))
    with StreamingServer(chunks=3) as server:
        env = project_env(BENCH_REDIS_URL, database_url, server.base_url, **broker_env)
        worker = WorkerProcess(env, workdir / f"worker-{store_name}.log", threads=threads)
        worker.start(timeout=180)
        assert worker.process is not None
        meter = TreeMeter(worker.process.pid).start()

        def completed() -> int:
            with store.engine.connect() as connection:
                return int(connection.execute(completed_count).scalar_one())

        try:
            wait_until(lambda: completed() >= jobs, timeout=jobs + 120, interval=0.1, what="the batch to drain")
        finally:
            meter.stop()
            worker.stop()
        first_request = min(server.received.values())
    with store.engine.connect() as connection:
        finished = [row[0] for row in connection.execute(select(JobRow.finished_at)).all() if row[0] is not None]
    span = max(moment.timestamp() for moment in finished) - first_request
    _flush(BENCH_REDIS_URL)
    send_ms, insert_ms = enqueue_costs(store, run)
    _flush(BENCH_REDIS_URL)
    store.engine.dispose()
    return ThroughputFigures(
        name=f"this project, {store_name}" + (", RabbitMQ" if broker_env else ""),
        jobs=jobs,
        completed=len(finished),
        jobs_per_s=jobs / span,
        cpu_ms_per_job=cpu_ms_per(meter, jobs),
        enqueue_ms=enqueue_ms,
        send_ms=send_ms,
        insert_ms=insert_ms,
    )


def run_bare(actor_name: str, label: str, *, jobs: int, threads: int, workdir: Path) -> ThroughputFigures:
    """Bare Dramatiq draining ``jobs`` queued messages of ``actor_name``."""
    import redis
    from dramatiq.brokers.redis import RedisBroker

    from bench.bare_actors import DONE_KEY, QUEUE, send_bare
    from tests.harness import WorkerProcess, wait_until

    _flush(BENCH_REDIS_URL)
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    sender = RedisBroker(url=BENCH_REDIS_URL, middleware=[])  # type: ignore[no-untyped-call]
    sender.declare_queue(QUEUE)
    with StreamingServer(chunks=3) as server:
        for index in range(jobs):
            send_bare(sender, actor_name, f"b{index}", server.base_url)
        worker = WorkerProcess(
            bare_env(BENCH_REDIS_URL),
            workdir / f"worker-{actor_name}.log",
            threads=threads,
            actors_module="bench.bare_actors",
        ).start(timeout=180)
        assert worker.process is not None
        meter = TreeMeter(worker.process.pid).start()
        try:
            wait_until(lambda: client.hlen(DONE_KEY) >= jobs, timeout=jobs + 120, interval=0.1, what="the bare batch")
        finally:
            meter.stop()
            worker.stop()
        first_request = min(server.received.values())
    done = [float(value) for value in client.hvals(DONE_KEY)]
    client.close()
    sender.close()
    _flush(BENCH_REDIS_URL)
    return ThroughputFigures(
        name=label,
        jobs=jobs,
        completed=len(done),
        jobs_per_s=jobs / (max(done) - first_request),
        cpu_ms_per_job=cpu_ms_per(meter, jobs),
    )


@contextmanager
def database_for(store_name: str, workdir: Path) -> Any:
    """A fresh database of ``store_name`` for one run."""
    if store_name == "sqlite":
        yield f"sqlite:///{workdir / f'throughput-{uuid.uuid4().hex[:6]}.db'}"
        return
    with fresh_postgres() as url:
        yield url


def main(argv: list[str] | None = None) -> int:
    """Run each configuration once and print two Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--broker", choices=BROKERS, default="redis", help="this project's broker (BROKER_URL)")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args(argv)
    stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    if args.jobs < 1 or set(stores) - {"sqlite", "postgresql"}:
        parser.error("--jobs must be at least 1 and --stores a subset of sqlite,postgresql")
    os.environ["REDIS_URL"] = BENCH_REDIS_URL
    load_before = os.getloadavg()[0]
    results: list[ThroughputFigures] = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for store_name in stores:
            with database_for(store_name, Path(tmp)) as url, message_broker(args.broker, BENCH_REDIS_URL) as extra:
                results.append(
                    run_project(
                        store_name, url, jobs=args.jobs, threads=args.threads, workdir=Path(tmp), broker_env=extra
                    )
                )
        if not args.no_baseline:
            for actor_name, label in (
                ("bare_stream_async", "bare Dramatiq, async httpx"),
                ("bare_stream_sync", "bare Dramatiq, sync httpx"),
            ):
                results.append(run_bare(actor_name, label, jobs=args.jobs, threads=args.threads, workdir=Path(tmp)))
    print(
        f"throughput: {args.jobs} instant jobs (3 chunks) queued, then drained by 1 worker process x "
        f"{args.threads} threads; load average before: {load_before:.1f}"
    )
    print("| measure | " + " | ".join(r.name for r in results) + " |")
    print("|---" * (len(results) + 1) + "|")
    print("| jobs/s | " + " | ".join(f"{r.jobs_per_s:.0f}" for r in results) + " |")
    print("| CPU ms per job (worker tree) | " + " | ".join(f"{r.cpu_ms_per_job:.1f}" for r in results) + " |")
    print("| completed | " + " | ".join(f"{r.completed} of {r.jobs}" for r in results) + " |")
    print()
    print(f"enqueue cost, ms (p50 / p95; enqueue_generation over the {args.jobs} jobs, others {ENQUEUE_SAMPLES} each)")
    print("| store | enqueue_generation | actor.send | raw INSERT, one row per transaction |")
    print("|---|---|---|---|")
    for r in results:
        if r.enqueue_ms:
            cells = [
                f"{percentile(v, 0.5):.2f} / {percentile(v, 0.95):.2f}" for v in (r.enqueue_ms, r.send_ms, r.insert_ms)
            ]
            print(f"| {r.name.removeprefix('this project, ')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
