"""How fast a cancel stops a running stream: the Redis pub/sub signal against the heartbeat-only baseline.

For each mode, a real worker process streams slow answers from the loopback OpenRouter server while
this process cancels them one by one through ``cancel_job``. Measured per cancel: from ``cancel_job``
returning to the server seeing the connection closed, and to ``get_job`` reading ``cancelled``.

    python -m bench.cancel [--jobs 200] [--threads 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by nearest rank."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def run_mode(*, signals: bool, jobs: int, threads: int, workdir: Path) -> dict[str, Any]:
    """Cancel ``jobs`` running streams with the pub/sub signal on or off; return the latencies in ms."""
    import actors
    from actors import cancel_job, enqueue_generation, get_job
    from actors.queue import JobQueue
    from repositories.store import JobStatus
    from settings import Settings
    from tests.harness import WorkerProcess, wait_until
    from tests.loopback.openrouter import OpenRouterServer, Reply

    database_url = f"sqlite:///{workdir / f'cancel-{signals}.db'}"
    settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL)
    queue = JobQueue(settings)
    queue.bind()
    actors.broker.flush_all()
    close_ms: list[float] = []
    status_ms: list[float] = []
    with OpenRouterServer() as server:
        server.default = Reply.ok(*[f"w{i} " for i in range(2000)], chunk_delay_s=0.05)
        env = {
            **os.environ,
            "REDIS_URL": BENCH_REDIS_URL,
            "DATABASE_URL": database_url,
            "OPENROUTER_BASE_URL": server.base_url,
            "OPENROUTER_API_KEY": "bench",
            "CANCEL_SIGNALS": "true" if signals else "false",
            "PYTHONUNBUFFERED": "1",
        }
        worker = WorkerProcess(env, workdir / f"worker-{signals}.log", threads=threads).start()
        try:
            done = 0
            while done < jobs:
                batch = min(threads, jobs - done)
                ids = [f"cancel-{uuid.uuid4().hex}" for _ in range(batch)]
                for index, job_id in enumerate(ids):
                    prompt = f"stream [[{job_id}]]"  # routes the request to this job on the server
                    enqueue_generation(
                        user_id=f"bench-{index % 4}",
                        params={"model": "m", "messages": [{"role": "user", "content": prompt}]},
                        job_id=job_id,
                    )
                for job_id in ids:
                    wait_until(_streaming(get_job, job_id), timeout=30, what=f"{job_id} to stream")
                for job_id in ids:
                    job = get_job(job_id)
                    assert job is not None
                    assert cancel_job(job_id, user_id=job.user_id)
                    returned = time.time()
                    status_ms.append(_until_cancelled(get_job, job_id, JobStatus.CANCELLED) * 1000)
                    closed = server.wait_for_close(server.requests_for(job_id)[0], timeout=10)
                    assert closed.closed_at is not None
                    close_ms.append((closed.closed_at - returned) * 1000)
                done += batch
        finally:
            worker.stop()
    actors.broker.flush_all()
    return {"close_ms": close_ms, "status_ms": status_ms}


def _streaming(get_job: Any, job_id: str) -> Callable[[], bool]:
    def check() -> bool:
        job = get_job(job_id)
        return bool(job is not None and job.content)

    return check


def _until_cancelled(get_job: Any, job_id: str, cancelled: Any) -> float:
    start = time.perf_counter()
    while True:
        job = get_job(job_id)
        if job is not None and job.status is cancelled:
            return time.perf_counter() - start
        if time.perf_counter() - start > 10:
            raise TimeoutError(f"{job_id} never read cancelled")


def summarise(name: str, values: list[float]) -> str:
    """One table row: p50, p95, p99 and max in milliseconds."""
    return (
        f"| {name} | {len(values)} | {percentile(values, 0.5):.1f} | {percentile(values, 0.95):.1f} "
        f"| {percentile(values, 0.99):.1f} | {max(values):.1f} | {statistics.mean(values):.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Run both modes and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args(argv)
    os.environ["REDIS_URL"] = BENCH_REDIS_URL
    with tempfile.TemporaryDirectory(prefix="bench-cancel-") as tmp:
        signal_run = run_mode(signals=True, jobs=args.jobs, threads=args.threads, workdir=Path(tmp))
        baseline = run_mode(signals=False, jobs=args.jobs, threads=args.threads, workdir=Path(tmp))
    print(f"cancel latency, {args.jobs} running streams per mode, worker --threads {args.threads}, SQLite store")
    print("| measure | n | p50 ms | p95 ms | p99 ms | max ms | mean ms |")
    print("|---|---|---|---|---|---|---|")
    print(summarise("connection closed, pub/sub signal", signal_run["close_ms"]))
    print(summarise("connection closed, heartbeat only (baseline)", baseline["close_ms"]))
    print(summarise("status reads cancelled, pub/sub signal", signal_run["status_ms"]))
    print(summarise("status reads cancelled, heartbeat only", baseline["status_ms"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
