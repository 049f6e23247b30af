"""How long a job of a worker killed with SIGKILL takes to complete elsewhere: our broker settings against Dramatiq's.

A worker streams a job whose provider stalls; it is killed with SIGKILL and a fresh worker starts.
Measured: from the kill to the job's completion by the fresh worker. The baseline runs the same
code with Dramatiq's stock Redis broker settings (60 s heartbeat timeout, maintenance on 1 command
in 1000, idle consumers backing off to 1 s), set by ``bench.stock_broker_actors``.

    python -m bench.recovery [--runs 3] [--baseline-runs 1] [--baseline-cap-s 400]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def recover_once(actors_module: str, workdir: Path, cap_s: float) -> float | None:
    """Seconds from SIGKILL to completion, or None past ``cap_s``."""
    import actors
    from actors import enqueue_generation, get_job
    from actors.queue import JobQueue
    from repositories.store import JobStatus
    from settings import Settings
    from tests.harness import WorkerProcess, wait_until
    from tests.loopback.openrouter import OpenRouterServer, Reply

    database_url = f"sqlite:///{workdir / f'recovery-{uuid.uuid4().hex[:6]}.db'}"
    settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL)
    queue = JobQueue(settings)
    queue.bind()
    actors.broker.client.flushdb()
    job_id = f"recover-{uuid.uuid4().hex[:8]}"
    with OpenRouterServer() as server:
        server.script_for(job_id, Reply.ok("first", stall_after_chunks=1), Reply.ok("second"))
        env = {
            **os.environ,
            "REDIS_URL": BENCH_REDIS_URL,
            "DATABASE_URL": database_url,
            "OPENROUTER_BASE_URL": server.base_url,
            "OPENROUTER_API_KEY": "bench",
            "PYTHONUNBUFFERED": "1",
        }
        doomed = WorkerProcess(env, workdir / "doomed.log", threads=2, actors_module=actors_module).start()
        params = {"model": "m", "messages": [{"role": "user", "content": f"go [[{job_id}]]"}]}
        enqueue_generation(user_id="u1", params=params, job_id=job_id)
        wait_until(lambda: (job := get_job(job_id)) and job.content == "first", timeout=30)
        doomed.kill()
        killed = time.monotonic()
        survivor = WorkerProcess(env, workdir / "survivor.log", threads=2, actors_module=actors_module).start()
        try:
            wait_until(
                lambda: (job := get_job(job_id)) and job.status is JobStatus.COMPLETED,
                timeout=cap_s,
                interval=0.1,
            )
            return time.monotonic() - killed
        except AssertionError:
            return None
        finally:
            survivor.stop()
            actors.broker.client.flushdb()


def main(argv: list[str] | None = None) -> int:
    """Measure both configurations and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline-runs", type=int, default=1, help="each can take minutes")
    parser.add_argument("--baseline-cap-s", type=float, default=400.0)
    args = parser.parse_args(argv)
    os.environ["REDIS_URL"] = BENCH_REDIS_URL
    results: dict[str, list[float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        results["this project's settings (15 s heartbeat, maintenance 1 in 10)"] = [
            recover_once("actors", Path(tmp), 120) for _ in range(args.runs)
        ]
        results["Dramatiq's stock broker settings"] = [
            recover_once("bench.stock_broker_actors", Path(tmp), args.baseline_cap_s) for _ in range(args.baseline_runs)
        ]
    print(f"recovery after SIGKILL of the worker running a job ({args.runs} runs; baseline {args.baseline_runs})")
    print("| configuration | runs (s) | median (s) |")
    print("|---|---|---|")
    for name, values in results.items():
        shown = ", ".join(f"{v:.1f}" if v is not None else f"> {args.baseline_cap_s:.0f}" for v in values)
        finished = [v for v in values if v is not None]
        median = f"{statistics.median(finished):.1f}" if finished and len(finished) == len(values) else "n/a"
        print(f"| {name} | {shown} | {median} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
