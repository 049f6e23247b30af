"""Per-user throttling under a heavy user: this project's middleware against the naive stock limiter.

One heavy user submits 300 jobs and 30 light users 2 each; the loopback provider answers each in
about 300 ms; the per-user limit is 5; one worker process runs 32 threads. Printed for each mode:
makespan against the ideal lower bound, light users' wait before start, peak concurrency per user,
redeliveries, and failed jobs.

    python -m bench.throttle [--heavy 300] [--light-users 30] [--threads 32]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, cast

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
REPLY_SECONDS = 0.3
LIMIT = 5
MODES = ("middleware", "polling", "naive")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def run_mode(mode: str, *, heavy: int, light_users: int, threads: int, workdir: Path) -> dict[str, Any]:
    """Run the workload through ``mode`` and measure it.

    Modes: ``middleware`` (per-user admission as deployed), ``polling`` (the same with the broker's idle-consumer
    wake-ups off, so handed-off messages are found by polling alone), ``naive`` (the stock limiter).
    """
    import actors
    from actors import enqueue_generation
    from actors.queue import JobQueue
    from admission.user_admission import UserAdmission
    from bench.throttle_actors import DELIVERIES_KEY, generate_naive
    from repositories.store import JobStatus
    from settings import Settings
    from tests.harness import WorkerProcess, wait_until
    from tests.loopback.openrouter import OpenRouterServer, Reply

    # Count the jobs the API parks as it sends them (they never show up as a redelivery).
    parked_at_send = [0]
    park_behind_backlog = UserAdmission.park_behind_backlog

    def counting(self: UserAdmission, broker: Any, message: Any) -> bool:
        parked = park_behind_backlog(self, broker, message)
        parked_at_send[0] += parked
        return parked

    UserAdmission.park_behind_backlog = counting  # type: ignore[method-assign]

    database_url = f"sqlite:///{workdir / f'throttle-{mode}.db'}"
    settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL)
    queue = JobQueue(settings)
    queue.bind()
    store = queue.store
    actors.broker.client.flushdb()
    run = uuid.uuid4().hex[:6]
    jobs: list[tuple[str, str, str]] = [(f"heavy-{run}", f"{mode}-h{i}-{run}", "heavy") for i in range(heavy)]
    for user in range(light_users):
        jobs += [(f"light{user}-{run}", f"{mode}-l{user}-{i}-{run}", "light") for i in range(2)]
    enqueued: dict[str, float] = {}
    with OpenRouterServer() as server:
        server.default = Reply.ok("ok", first_chunk_delay_s=REPLY_SECONDS, keepalive_comments=False)
        env = {
            **os.environ,
            "REDIS_URL": BENCH_REDIS_URL,
            "DATABASE_URL": database_url,
            "OPENROUTER_BASE_URL": server.base_url,
            "OPENROUTER_API_KEY": "bench",
            "GENERATE_USER_CONCURRENCY": str(LIMIT),
            "PYTHONUNBUFFERED": "1",
            "BENCH_WAKE_IDLE_CONSUMERS": "false" if mode == "polling" else "true",
            # polling alone, at the 20 ms cap that was the default before consumers woke on a push
            **({"WORKER_POLL_INTERVAL_MS": "20"} if mode == "polling" else {}),
        }
        worker = WorkerProcess(
            env, workdir / f"worker-{mode}.log", threads=threads, actors_module="bench.throttle_actors"
        )
        worker.start()
        try:
            started = time.time()
            for user_id, job_id, _ in jobs:
                params = {"model": "m", "messages": [{"role": "user", "content": f"go [[{job_id}]]"}]}
                enqueued[job_id] = time.time()
                if mode in ("middleware", "polling"):
                    enqueue_generation(user_id=user_id, params=params, job_id=job_id)
                else:
                    generate_naive.send(job_id=job_id, user_id=user_id, params=params)

            client = actors.broker.client

            def all_handled() -> bool:
                # Done when no message is queued, delayed, unacked or parked any more: the naive mode
                # loses jobs whose retries ran out before they ever got a slot, so rows alone cannot tell.
                queues = [
                    key
                    for key in client.scan_iter(match="dramatiq:*.msgs")
                    if not key.endswith(b".XQ.msgs") and client.hlen(key)  # dead letters are handled
                ]
                parked = list(client.scan_iter(match="llm-throttle:parked:*"))
                return not queues and not parked

            wait_until(all_handled, timeout=900, interval=0.2, what="every message to be handled")
            raw_deliveries = cast(dict[bytes, bytes], actors.broker.client.hgetall(DELIVERIES_KEY))
            deliveries = {key.decode(): int(value) for key, value in raw_deliveries.items()}
        finally:
            worker.stop()
        requests = server.requests
    first_request: dict[str, float] = {}
    intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    kinds = {job_id: kind for _, job_id, kind in jobs}
    users = {job_id: user_id for user_id, job_id, _ in jobs}
    for request in requests:
        job_id = request.last_message_text.split("[[")[-1].rstrip("]")
        first_request.setdefault(job_id, request.received_at)
        intervals[users[job_id]].append((request.received_at, request.closed_at or request.received_at))
    UserAdmission.park_behind_backlog = park_behind_backlog  # type: ignore[method-assign]
    rows = {job.job_id: job for job in store.list_jobs(limit=len(jobs) + 10)}
    makespan = max(job.finished_at.timestamp() for job in rows.values() if job.finished_at) - started
    total_work = len(jobs) * REPLY_SECONDS
    ideal = max(math.ceil(heavy / LIMIT) * REPLY_SECONDS, total_work / threads)
    light_waits = [
        first_request[j] - enqueued[j] for j, kind in kinds.items() if kind == "light" and j in first_request
    ]
    redelivered = [count - 1 for count in deliveries.values() if count > 1]
    throttled = len(redelivered) + parked_at_send[0]
    heavy_busy = sum(end - start for start, end in intervals[f"heavy-{run}"])
    return {
        "makespan": makespan,
        "ideal": ideal,
        "light_p50": percentile(light_waits, 0.5),
        "light_p95": percentile(light_waits, 0.95),
        "peak_heavy": max(peak_overlap(intervals[f"heavy-{run}"]), 0),
        "peak_light": max(peak_overlap(v) for k, v in intervals.items() if k.startswith("light")),
        "redeliveries_per_job": sum(redelivered) / len(jobs),
        "redeliveries_per_throttled_job": (sum(redelivered) / throttled) if throttled else 0.0,
        "throttled_jobs": throttled,
        "parked_by_worker": len(redelivered),
        "parked_at_send": parked_at_send[0],
        "failed": len(jobs) - sum(1 for job in rows.values() if job.status is JobStatus.COMPLETED),
        "jobs": len(jobs),
        # what the heavy user's slots spend outside provider requests, per job: claim, writes, handoff
        "heavy_gap_ms": (makespan * LIMIT - heavy_busy) / heavy * 1000,
        "heavy_request_ms": heavy_busy / heavy * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the modes and print a Markdown table, one column per mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--heavy", type=int, default=300)
    parser.add_argument("--light-users", type=int, default=30)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    os.environ["REDIS_URL"] = BENCH_REDIS_URL
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-throttle-") as tmp:
        for mode in args.modes:
            results[mode] = run_mode(
                mode, heavy=args.heavy, light_users=args.light_users, threads=args.threads, workdir=Path(tmp)
            )
    print(
        f"throttle: 1 heavy user x {args.heavy} jobs, {args.light_users} light users x 2 jobs, "
        f"provider {REPLY_SECONDS * 1000:.0f} ms per job, limit {LIMIT} per user, "
        f"1 worker process x {args.threads} threads"
    )
    headers = {
        "middleware": "UserThrottle middleware",
        "polling": "the same, idle consumers polling only",
        "naive": "naive ConcurrentRateLimiter in the actor",
    }
    print("| measure | " + " | ".join(headers[mode] for mode in args.modes) + " |")
    print("|---" * (len(args.modes) + 1) + "|")
    ordered = [results[mode] for mode in args.modes]
    rows = [
        ("makespan (s)", "{makespan:.1f}"),
        ("ideal lower bound (s)", "{ideal:.1f}"),
        ("makespan / ideal", None),
        ("light users' wait before start, p50 (ms)", None),
        ("light users' wait before start, p95 (ms)", None),
        ("heavy user's provider request, mean (ms)", "{heavy_request_ms:.0f}"),
        ("heavy user's slot time outside requests, per job (ms)", "{heavy_gap_ms:.0f}"),
        ("peak concurrency, heavy user", "{peak_heavy}"),
        ("peak concurrency, any light user", "{peak_light}"),
        ("redeliveries per job (all jobs)", "{redeliveries_per_job:.2f}"),
        ("redeliveries per throttled job", "{redeliveries_per_throttled_job:.2f}"),
        ("jobs throttled at least once", "{throttled_jobs}"),
        ("... parked by the API as they were sent (delivered once)", "{parked_at_send}"),
        ("... parked or refused by a worker (redelivered)", "{parked_by_worker}"),
        ("jobs not completed (failed or lost)", "{failed} of {jobs}"),
    ]
    for label, template in rows:
        if label == "makespan / ideal":
            cells = [f"{r['makespan'] / r['ideal']:.3f}" for r in ordered]
        elif label.startswith("light users' wait"):
            field = "light_p50" if "p50" in label else "light_p95"
            cells = [f"{r[field] * 1000:.0f}" for r in ordered]
        else:
            assert template is not None
            cells = [template.format(**r) for r in ordered]
        print(f"| {label} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
