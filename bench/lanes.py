"""Provider lanes against a provider quota: lanes set to the quota beside today's behaviour (no lanes).

A loopback OpenRouter enforces a quota per key (scaled up to a 10 s window so the run takes minutes:
100 requests and 30,000 tokens per sliding 10 s, counting prompt and generated tokens; over it a 429
with ``Retry-After``). 600 jobs of 50 users (one heavy user with 159 jobs, 49 light users with 9),
prompts of 100 to 2,000 characters, ``max_tokens`` of 32 to 256 with answers of 30% to 100% of it,
all sent at once; 3 worker processes x 16 threads. Printed per mode: 429s received, retries spent,
jobs failed, throughput as a share of the quota, makespan against the quota's ideal, light users' wait.

    python -m bench.lanes [--jobs 600] [--modes lanes none]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
WINDOW_S = 10.0
QUOTA_REQUESTS = 100
QUOTA_TOKENS = 30_000
TOKEN_DELAY_S = 0.004
MODES = ("lanes", "none")
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "judge",
    "boxing",
    "matches",
]


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def workload(count: int, seed: int = 12) -> list[tuple[str, str, dict[str, Any]]]:
    """``count`` jobs (user, job id, params): the heavy user's first, then the light users' interleaved."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:6]
    heavy = max(1, count - 49 * 9)
    users = [("heavy", heavy)] + [(f"light{index}", 9) for index in range(49)]
    jobs = []
    for user, n in users:
        for index in range(n):
            job_id = f"{user}-{index}-{run}"
            max_tokens = rng.choice([32, 64, 128, 256])
            answer = max(1, int(max_tokens * rng.uniform(0.3, 1.0)))
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))[: rng.randint(100, 2000)]
            content = f"{words} [[answer={answer}]] [[{job_id}]]"
            params = {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
            jobs.append((f"{user}-{run}", job_id, params))
    light = [job for job in jobs if not job[0].startswith("heavy")]
    rng.shuffle(light)
    return [job for job in jobs if job[0].startswith("heavy")] + light


def run_mode(mode: str, *, jobs: list[tuple[str, str, dict[str, Any]]], workdir: Path) -> dict[str, Any]:
    """Send the workload through 3 worker processes with lanes matching the quota (``lanes``) or none."""
    import actors
    from actors import enqueue_generation
    from actors.queue import JobQueue
    from actors.wiring import lane_book
    from admission.lane_store import RedisLaneStore
    from repositories.store import JobStatus
    from settings import Settings
    from tests.harness import WorkerProcess, wait_until
    from tests.loopback.quota import QuotaServer

    database_url = f"sqlite:///{workdir / f'lanes-{mode}.db'}"
    lanes = []
    if mode == "lanes":
        lanes = [
            {
                "provider": "openrouter",
                "requests_per_minute": QUOTA_REQUESTS,
                "tokens_per_minute": QUOTA_TOKENS,
                "window_s": WINDOW_S,
            }
        ]
    settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL, provider_lanes=json.dumps(lanes))
    queue = JobQueue(settings)
    queue.bind()
    store = queue.store
    actors.broker.client.flushdb()
    load_before = os.getloadavg()
    with QuotaServer(
        requests=QUOTA_REQUESTS, tokens=QUOTA_TOKENS, window_s=WINDOW_S, token_delay_s=TOKEN_DELAY_S
    ) as server:
        env = {
            **os.environ,
            "REDIS_URL": BENCH_REDIS_URL,
            "DATABASE_URL": database_url,
            "OPENROUTER_BASE_URL": server.base_url,
            "OPENROUTER_API_KEY": "bench-key",
            "PROVIDER_LANES": json.dumps(lanes),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        worker = WorkerProcess(env, workdir / f"worker-{mode}.log", threads=16, processes=3).start(timeout=120)
        try:
            enqueued: dict[str, float] = {}
            started = time.time()
            for user_id, job_id, params in jobs:
                enqueued[job_id] = time.time()
                enqueue_generation(user_id=user_id, params=params, job_id=job_id)

            def all_final() -> bool:
                counts = store.count_by_status()
                return sum(counts.get(s, 0) for s in (JobStatus.PENDING, JobStatus.PROCESSING)) == 0

            wait_until(all_final, timeout=1800, interval=0.5, what="every job to end")
            episodes = 0
            book = lane_book(Settings(provider_lanes=json.dumps(lanes), openrouter_api_key="bench-key"))
            for lane in book.lanes:
                episodes += RedisLaneStore(actors.broker.client).stats(lane).pause_episodes
        finally:
            worker.stop()
        requests = server.requests
        rate_limited = server.rate_limited_count
        tokens_served = server.tokens_served()
    rows = store.list_jobs(limit=len(jobs) + 10)
    finished = [job.finished_at.timestamp() for job in rows if job.finished_at]
    makespan = max(finished) - started
    served = [r for r in requests if r.reply is not None and r.reply.status == 200]
    first_ok: dict[str, float] = {}
    for request in served:
        job_id = request.last_message_text.rsplit("[[", 1)[-1].rstrip("]")
        first_ok.setdefault(job_id, request.received_at)
    light_waits = [first_ok[j] - enqueued[j] for j in enqueued if j.startswith("light") and j in first_ok]
    completed = sum(1 for job in rows if job.status is JobStatus.COMPLETED)
    # The workload's ideal: every job once at the quota's rate; the share counts the work done (completed jobs).
    windows = max(len(jobs) / QUOTA_REQUESTS, tokens_served / QUOTA_TOKENS)
    done_windows = max(completed / QUOTA_REQUESTS, tokens_served / QUOTA_TOKENS)
    return {
        "rate_limited": rate_limited,
        "episodes": episodes,
        "retries": sum(job.retries for job in rows),
        "failed": len(jobs) - completed,
        "jobs": len(jobs),
        "requests": len(requests),
        "tokens": tokens_served,
        "makespan": makespan,
        "ideal": windows * WINDOW_S,
        "ideal_burst": (windows - 1) * WINDOW_S,
        "bound": "tokens" if tokens_served / QUOTA_TOKENS >= len(jobs) / QUOTA_REQUESTS else "requests",
        "share": done_windows * WINDOW_S / makespan,
        "light_p50": percentile(light_waits, 0.5) if light_waits else float("nan"),
        "light_p95": percentile(light_waits, 0.95) if light_waits else float("nan"),
        "load": f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}",
    }


def main(argv: list[str] | None = None) -> int:
    """Run the modes one after the other and print a Markdown table, one column per mode."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args(argv)
    os.environ["REDIS_URL"] = BENCH_REDIS_URL
    jobs = workload(args.jobs)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-lanes-") as tmp:
        for mode in args.modes:
            results[mode] = run_mode(mode, jobs=jobs, workdir=Path(tmp))
    print(
        f"lanes: {len(jobs)} jobs of 50 users sent at once, quota {QUOTA_REQUESTS} requests and "
        f"{QUOTA_TOKENS} tokens per sliding {WINDOW_S:.0f} s per key, 3 worker processes x 16 threads"
    )
    headers = {"lanes": "lanes set to the quota", "none": "no lanes (today)"}
    ordered = [results[mode] for mode in args.modes]
    print("| measure | " + " | ".join(headers[mode] for mode in args.modes) + " |")
    print("|---" * (len(args.modes) + 1) + "|")
    rows: list[tuple[str, str]] = [
        ("429s received", "{rate_limited}"),
        ("lane pause episodes", "{episodes}"),
        ("retries spent (all on 429s)", "{retries}"),
        ("jobs failed", "{failed} of {jobs}"),
        ("requests sent (incl. 429s)", "{requests}"),
        ("tokens served (prompt + generated)", "{tokens}"),
        ("makespan (s)", "{makespan:.1f}"),
        ("ideal: every job at the quota's rate (s), bound by", "{ideal:.1f} ({bound})"),
        ("makespan / ideal", "{ratio:.3f}"),
        ("throughput of completed work, share of the quota", "{share:.1%}"),
        ("sliding-window lower bound, one burst window less (s)", "{ideal_burst:.1f}"),
        ("light users' wait to first request, p50 (s)", "{light_p50:.1f}"),
        ("light users' wait to first request, p95 (s)", "{light_p95:.1f}"),
        ("load average (1 min) before -> after", "{load}"),
    ]
    for result in ordered:
        result["ratio"] = result["makespan"] / result["ideal"]
    for label, template in rows:
        print(f"| {label} | {' | '.join(template.format(**r) for r in ordered)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
