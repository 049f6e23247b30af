"""Soak under faults (issue 11): many jobs through 3 workers while the infrastructure misbehaves.

Provider faults at random (429 with Retry-After, 5xx, mid-stream drops, a 503 whose body repeats the
API key), two worker SIGKILLs, one Redis restart without persistence and one PostgreSQL outage (the
proxy in front of it refuses connections). The Redis server, the PostgreSQL proxy and database, the
loopback provider, the three workers and the scheduler (reconciler) are all this script's own.

Printed: jobs final / completed / lost (not final) / stuck, provider calls beyond the scripted ones
(the re-runs of attempts a SIGKILL cut), the highest number of streams one user had open at once
against its limit, the time from the end of the last fault to the last job final, and the
occurrences of the key in logs, the job store and Redis.

    python -m bench.soak [--jobs 1000] [--users 50] [--limit 3] [--outage-s 30]

The issue's figure is 5,000 jobs and 100 users; the default is smaller so a run takes minutes on a
small machine (``--jobs 5000 --users 100`` runs the full size).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
KEY = "sk-or-soak-" + "KEYMUSTNEVERAPPEAR0123"


#: The most stranded jobs one sample lists (the reconciler's own page size).
STUCK_CAP = 1000


class StrandedWatch:
    """Counts, once a second in a thread, the jobs the reconciler would call stuck (no live path)."""

    def __init__(self, redis_url: str, database_url: str, *, lease_s: float) -> None:
        import threading

        from actors.queue import JobQueue
        from settings import Settings

        self.queue = JobQueue(Settings(redis_url=redis_url, database_url=database_url))
        self.queue.bind()  # the reconciler reads the actors' queue names from the broker they are bound to
        self.reconciler = self.queue.reconciler(pending_after_s=10, lease_s=lease_s)
        self.most, self.most_at, self.last_stranded_at = 0, 0.0, 0.0
        self.taken = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                seen = self.reconciler.stuck(limit=STUCK_CAP)
            except Exception:
                self.failed += 1  # Redis restarting, PostgreSQL refusing: the sample is lost, not the job
                continue
            self.taken += 1
            stranded = len(seen.processing) + len(seen.pending)
            now = time.monotonic()
            if stranded:
                self.last_stranded_at = now
            if stranded > self.most:
                self.most, self.most_at = stranded, now

    def stop(self) -> None:
        """Stop sampling and close the queue's connections."""
        self._stop.set()
        self._thread.join(timeout=30)
        self.queue.close()


def main(argv: list[str] | None = None) -> int:  # one scenario, read top to bottom
    """Run the soak and print its figures; non-zero when a job was lost or stuck or the limit was exceeded."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--limit", type=int, default=3, help="GENERATE_USER_CONCURRENCY")
    parser.add_argument("--outage-s", type=float, default=30.0, help="how long PostgreSQL refuses connections")
    parser.add_argument("--cap-s", type=float, default=600.0, help="give up waiting after this long")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from repositories.migrations import upgrade_database
    from repositories.store import FINAL_STATUSES, JobStatus, JobStore, create_store_engine
    from tests.faults.harness import FaultStack, RedisServer, max_overlap, stream_intervals
    from tests.faults.proxy import TcpProxy
    from tests.loopback.openrouter import OpenRouterServer, Reply

    rng = random.Random(args.seed)
    name = f"llmq_soak_{uuid.uuid4().hex[:8]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    database_url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    pg = make_url(database_url)
    status = 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    with TcpProxy(pg.host or "", pg.port or 5432) as proxy:
        engine = create_store_engine(database_url)
        upgrade_database(engine)
        provider = OpenRouterServer().start()
        stack = FaultStack(
            redis_server=RedisServer(workdir).start(),
            store=JobStore(engine),
            database_url=database_url,
            worker_database_url=proxy.rewrite_url(database_url),
            provider=provider,
            log_dir=workdir,
            extra_env={
                "OPENROUTER_API_KEY": KEY,
                "GENERATE_USER_CONCURRENCY": str(args.limit),
                "LOG_LEVEL": "WARNING",
            },
        )
        try:
            expected_calls: dict[str, int] = {}
            user_of: dict[str, str] = {}
            chunks = tuple(f"c{i} " for i in range(8))
            for index in range(args.jobs):
                job_id = f"soak-{index:05d}-{uuid.uuid4().hex[:6]}"
                roll = rng.random()
                ok = Reply.ok(*chunks, chunk_delay_s=0.1)
                if roll < 0.10:
                    script = [Reply.error(429, retry_after=1), ok]
                elif roll < 0.20:
                    script = [Reply.error(rng.choice((500, 502, 503, 529))), ok]
                elif roll < 0.28:
                    script = [Reply.ok(*chunks, chunk_delay_s=0.1, drop_after_chunks=3), ok]
                elif roll < 0.30:
                    script = [Reply.error(503, message=f"upstream rejected key {KEY}"), ok]
                else:
                    script = [ok]
                provider.script_for(job_id, *script)
                expected_calls[job_id] = len(script)
                user_of[job_id] = f"soak-user-{rng.randrange(args.users)}"
            workers = [stack.worker(f"worker-{index}", threads=8) for index in range(3)]
            stack.scheduler(LOG_LEVEL="WARNING", RECONCILE_INTERVAL_S="2", RECONCILE_PENDING_AFTER_S="10")
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=8) as senders:
                list(senders.map(lambda item: stack.submit(*item), user_of.items()))
            print(f"{args.jobs} jobs sent in {time.monotonic() - started:.1f} s", flush=True)
            watcher = StrandedWatch(stack.redis_server.url, database_url, lease_s=float(stack.env()["JOB_LEASE_S"]))

            def fault(what: str) -> None:
                print(f"t={time.monotonic() - started:5.1f}s {what}", flush=True)

            time.sleep(3)  # the faults come one after the other, a few seconds apart, while jobs flow
            workers[0].kill()
            fault("worker 0 SIGKILLed")
            workers[0].start()
            time.sleep(3)
            stack.redis_server.restart(down_s=1.0)
            fault("Redis restarted empty")
            time.sleep(3)
            proxy.set_mode("refuse")
            fault(f"PostgreSQL refuses connections for {args.outage_s:.0f} s")
            time.sleep(args.outage_s)
            proxy.set_mode("pass")
            fault("PostgreSQL back")
            time.sleep(3)
            workers[1].kill()
            last_fault = time.monotonic()
            fault("worker 1 SIGKILLed (the last fault)")
            workers[1].start()
            faults_over = time.monotonic()
            unfinished = sum(
                1 for job_id in user_of if (job := stack.store.get(job_id)) is None or job.status not in FINAL_STATUSES
            )
            fault(f"its replacement is ready; {unfinished} jobs not final yet")

            job_ids = list(user_of)
            deadline = started + args.cap_s
            remaining = set(job_ids)
            while remaining and time.monotonic() < deadline:
                for job_id in list(remaining):
                    job = stack.store.get(job_id)
                    if job is not None and job.status in FINAL_STATUSES:
                        remaining.discard(job_id)
                time.sleep(0.5)
            recovered = time.monotonic()
            watcher.stop()
            jobs = {job_id: stack.store.get(job_id) for job_id in job_ids}
            completed = sum(1 for job in jobs.values() if job is not None and job.status is JobStatus.COMPLETED)
            final = sum(1 for job in jobs.values() if job is not None and job.status in FINAL_STATUSES)
            stuck = 0
            if remaining:
                from datetime import timedelta

                from repositories.store import utcnow

                cutoff = utcnow() - timedelta(seconds=15)
                stuck = sum(1 for job_id in remaining if (job := jobs[job_id]) is not None and job.updated_at < cutoff)
            calls: dict[str, int] = defaultdict(int)
            per_user: dict[str, list[tuple[float, float]]] = defaultdict(list)
            requests = provider.requests
            for request, interval in zip(requests, stream_intervals(requests), strict=True):
                routed = next((key for key in _keys_of(request.last_message_text) if key in user_of), None)
                if routed is None:
                    continue
                calls[routed] += 1
                per_user[user_of[routed]].append(interval)
            extra_calls = sum(max(0, calls[job_id] - expected) for job_id, expected in expected_calls.items())
            peak = max((max_overlap(intervals) for intervals in per_user.values()), default=0)
            leaks = _key_occurrences(workdir, engine, stack)
            print()
            print("| figure | value | target |")
            print("|---|---|---|")
            print(f"| jobs final | {final} of {args.jobs} | {args.jobs} of {args.jobs} |")
            print(f"| jobs completed | {completed} | all |")
            print(f"| jobs lost (not final at the end) | {len(remaining)} | 0 |")
            print(f"| jobs stuck (not final, untouched 15 s) | {stuck} | 0 |")
            print(f"| provider calls beyond the scripted ones (re-runs after SIGKILL) | {extra_calls} | few |")
            print(f"| most streams of one user at once | {peak} (limit {args.limit}) | <= {args.limit} |")
            last_seen = watcher.last_stranded_at
            most = f"{'>= ' if watcher.most >= STUCK_CAP else ''}{watcher.most}"
            print(
                f"| jobs stranded (no live path, as the reconciler sees them), most at once "
                f"| {most} (at t={watcher.most_at - started:.0f} s) | |"
            )
            print(
                "| time from the last fault (the SIGKILL) until no job is stranded "
                f"| {max(0.0, last_seen - last_fault) if last_seen else 0.0:.1f} s | <= 120 s |"
            )
            print(f"| stranded-job samples (1 a second) taken / failed | {watcher.taken} / {watcher.failed} | |")
            print(
                f"| time from the last fault to every job final ({unfinished} were not final; the backlog drains) "
                f"| {recovered - faults_over:.1f} s | |"
            )
            print(f"| key occurrences in logs, job store, Redis | {leaks} | 0 |")
            print(f"| wall time | {recovered - started:.0f} s | |")
            if not remaining and peak <= args.limit and leaks == 0 and final == args.jobs:
                status = 0
            else:
                print(f"\nlogs kept in {workdir}; proxy connections open now: {proxy.connection_count()}")
        finally:
            stack.close()
            provider.stop()
            engine.dispose()
            if status == 0:
                shutil.rmtree(workdir, ignore_errors=True)
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    return status


def _keys_of(text: str) -> list[str]:
    """The ``[[key]]`` routing keys in a prompt."""
    found = []
    while "[[" in text:
        start = text.index("[[") + 2
        end = text.find("]]", start)
        if end < 0:
            break
        found.append(text[start:end])
        text = text[end + 2 :]
    return found


def _key_occurrences(workdir: Path, engine: object, stack: object) -> int:
    """How often the key appears in the processes' logs, in any job row and in any Redis value."""
    from sqlalchemy import Engine, text

    from tests.faults.harness import FaultStack

    assert isinstance(engine, Engine)
    assert isinstance(stack, FaultStack)
    count = sum(path.read_bytes().count(KEY.encode()) for path in workdir.glob("*.log"))
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT CAST(llm_job_results AS TEXT) FROM llm_job_results")).scalars()
        count += sum(str(row).count(KEY) for row in rows)
    client = stack.redis_server.client()
    try:
        for key in client.scan_iter(count=1000):
            kind = client.type(key)
            values: list[Any] = []
            if kind == b"string":
                values = [client.get(key) or b""]
            elif kind == b"hash":
                values = list(client.hvals(key))
            elif kind == b"list":
                values = list(client.lrange(key, 0, -1))
            elif kind == b"zset":
                values = list(client.zrange(key, 0, -1))
            elif kind == b"set":
                values = list(client.smembers(key))
            count += sum(bytes(value).count(KEY.encode()) for value in values)
    finally:
        client.close()
    return count


if __name__ == "__main__":
    sys.exit(main())
