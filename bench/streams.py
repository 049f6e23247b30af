"""Many long streams in one worker process: does every job's ``content`` still grow at least once a second?

N jobs of N users, each streaming ``--chunks`` text chunks ``--chunk-delay-s`` apart from one asyncio
loopback server (``bench.sse_server``), all running at once in one worker process (``--threads N``),
on SQLite and on PostgreSQL, side by side with bare Dramatiq (``bench.bare_actors``: the same call with
httpx, no SQL) in the same run. While the jobs run, ``--samples`` of them (spread over the batch) are
read every 250 ms; a job passes when, from its first text to its last, no gap between two observed
growths of ``content`` is longer than one second plus the sampling interval. Also printed: makespan
(first enqueue to last completion) / ideal (one stream's length), CPU cores and peak RSS of the worker
tree over the batch, and how many jobs completed.

    python -m bench.streams [--jobs 1000] [--stores sqlite,postgresql] [--no-baseline]
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.scale_support import (
    BENCH_REDIS_URL,
    BROKERS,
    TreeMeter,
    bare_env,
    fresh_postgres,
    message_broker,
    project_env,
)
from bench.sse_server import ProcessStreamingServer as StreamingServer

SAMPLE_INTERVAL_S = 0.25
MIB = 1024 * 1024


@dataclass
class RunFigures:
    """What one configuration measured."""

    name: str
    jobs: int
    completed: int
    makespan_s: float
    ideal_s: float
    cores: float
    peak_rss: int
    sampled: int = 0
    passed: int = 0
    longest_gaps_s: list[float] = field(default_factory=list)
    peak_open_streams: int = 0
    phases: Phases | None = None


@dataclass
class Phases:
    """Where the makespan went, in seconds after the first send (see ``Phases.of``)."""

    sends_done: float
    last_request: float
    stream_p50: float
    stream_max: float
    end_to_done_p50: float
    end_to_done_max: float

    @classmethod
    def of(
        cls, started: float, sent: float, received: dict[str, float], ended: dict[str, float], done: dict[str, float]
    ) -> Phases | None:
        """From the bench's clock (first send, last send), the server's (request in, stream out, per key) and
        the job's end (per key): the last send, the last request to reach the server, how long the server took
        to send each stream, and how long after its stream's end each job was done."""
        keys = [key for key in ended if key in received and key in done]
        if not keys:
            return None
        streams = sorted(ended[key] - received[key] for key in keys)
        lags = sorted(done[key] - ended[key] for key in keys)
        return cls(
            sends_done=sent - started,
            last_request=max(received.values()) - started,
            stream_p50=statistics.median(streams),
            stream_max=streams[-1],
            end_to_done_p50=statistics.median(lags),
            end_to_done_max=lags[-1],
        )


def _flush(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


class GrowthSampler:
    """Reads the content length of the sampled jobs at fixed ticks ``SAMPLE_INTERVAL_S`` apart, in a thread.

    Each read belongs to its tick (the moment it was due), not to the moment the bench's own thread got
    round to it: a growth seen at tick k happened after tick k-1's read. Gaps are counted in ticks, so the
    bench's own scheduling delays (its query, its GIL) never count against the worker; a tick missed
    because a read overran is simply skipped.
    """

    def __init__(self, engine: object, job_ids: list[str]) -> None:
        self.engine = engine
        self.job_ids = job_ids
        self.growths: dict[str, list[tuple[int, int]]] = {job_id: [] for job_id in job_ids}
        """Per job, (tick, content length) of each observed growth."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="growth-sampler", daemon=True)

    def start(self) -> GrowthSampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from sqlalchemy import func, select

        from repositories.store import JobRow

        query = select(JobRow.job_id, func.length(JobRow.content)).where(JobRow.job_id.in_(self.job_ids))
        first = time.monotonic()
        tick = 0
        while not self._stop.is_set():
            with self.engine.connect() as connection:  # type: ignore[attr-defined]
                rows = connection.execute(query).all()
            for job_id, length in rows:
                seen = self.growths[job_id]
                if (length or 0) > (seen[-1][1] if seen else 0):
                    seen.append((tick, length))
            tick = max(tick + 1, math.ceil((time.monotonic() - first) / SAMPLE_INTERVAL_S))
            self._stop.wait(max(0.0, first + tick * SAMPLE_INTERVAL_S - time.monotonic()))

    def longest_gaps(self) -> list[float]:
        """Per sampled job, the longest time between two observed growths of its content, in seconds (ticks)."""
        gaps = []
        for seen in self.growths.values():
            ticks = [tick for tick, _ in seen]
            longest = max((b - a for a, b in itertools.pairwise(ticks)), default=None)
            gaps.append(float("inf") if longest is None else longest * SAMPLE_INTERVAL_S)
        return gaps


def run_project(
    store_name: str,
    database_url: str,
    *,
    jobs: int,
    threads: int,
    samples: int,
    chunks: int,
    delay_s: float,
    workdir: Path,
    broker_env: dict[str, str],
) -> RunFigures:
    """This project's worker on ``database_url`` (with ``broker_env``: on RabbitMQ)."""
    from actors import enqueue_generation
    from actors.queue import JobQueue
    from repositories.store import FINAL_STATUSES, JobRow, JobStatus
    from settings import Settings
    from tests.harness import WorkerProcess, wait_until

    _flush(BENCH_REDIS_URL)
    settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL, broker_url=broker_env.get("BROKER_URL"))
    queue = JobQueue(settings)
    queue.bind()
    store = queue.store
    run = uuid.uuid4().hex[:6]
    job_ids = [f"s{i}-{run}" for i in range(jobs)]
    step = max(1, jobs // samples)
    sampled = job_ids[::step][:samples]
    with StreamingServer(chunks=chunks, chunk_delay_s=delay_s) as server:
        env = project_env(BENCH_REDIS_URL, database_url, server.base_url, **broker_env)
        worker = WorkerProcess(env, workdir / f"worker-{store_name}.log", threads=threads).start(timeout=180)
        assert worker.process is not None
        meter = TreeMeter(worker.process.pid).start()
        sampler = GrowthSampler(store.engine, sampled).start()
        started = time.time()
        try:
            for index, job_id in enumerate(job_ids):
                params = {"model": "bench", "messages": [{"role": "user", "content": f"go [[{job_id}]]"}]}
                enqueue_generation(user_id=f"u{index}-{run}", params=params, job_id=job_id)
            sent = time.time()
            from sqlalchemy import func, select

            finals = [str(status) for status in FINAL_STATUSES]
            count_final = select(func.count()).select_from(JobRow).where(JobRow.status.in_(finals))

            def all_final() -> bool:
                with store.engine.connect() as connection:
                    return int(connection.execute(count_final).scalar_one()) >= jobs

            wait_until(all_final, timeout=chunks * delay_s * 6 + 120, interval=0.5, what="every stream to end")
        finally:
            sampler.stop()
            meter.stop()
            worker.stop()
        with store.engine.connect() as connection:
            rows = connection.execute(select(JobRow.job_id, JobRow.status, JobRow.finished_at)).all()
        peak_open, received, ended = server.peak_open_streams, server.received, server.ended
    completed = [finished for _, status, finished in rows if status == str(JobStatus.COMPLETED) and finished]
    done = {job_id: finished.timestamp() for job_id, _, finished in rows if finished}
    makespan = max(finished.timestamp() for finished in completed) - started if completed else float("nan")
    gaps = sampler.longest_gaps()
    store.engine.dispose()
    _flush(BENCH_REDIS_URL)
    return RunFigures(
        name=f"this project, {store_name}" + (", RabbitMQ" if broker_env else ""),
        jobs=jobs,
        completed=len(completed),
        makespan_s=makespan,
        ideal_s=chunks * delay_s,
        cores=meter.cores,
        peak_rss=meter.peak_rss,
        sampled=len(sampled),
        passed=sum(1 for gap in gaps if gap <= delay_s + SAMPLE_INTERVAL_S + SAMPLE_INTERVAL_S / 2),
        longest_gaps_s=gaps,
        peak_open_streams=peak_open,
        phases=Phases.of(started, sent, received, ended, done),
    )


def run_bare(*, jobs: int, threads: int, chunks: int, delay_s: float, workdir: Path) -> RunFigures:
    """Bare Dramatiq streaming the same answers (no SQL, no middleware of this project)."""
    import redis
    from dramatiq.brokers.redis import RedisBroker

    from bench.bare_actors import DONE_KEY, QUEUE, send_bare
    from tests.harness import WorkerProcess, wait_until

    _flush(BENCH_REDIS_URL)
    client = redis.Redis.from_url(BENCH_REDIS_URL)
    sender = RedisBroker(url=BENCH_REDIS_URL, middleware=[])  # type: ignore[no-untyped-call]
    sender.declare_queue(QUEUE)
    with StreamingServer(chunks=chunks, chunk_delay_s=delay_s) as server:
        worker = WorkerProcess(
            bare_env(BENCH_REDIS_URL), workdir / "worker-bare.log", threads=threads, actors_module="bench.bare_actors"
        ).start(timeout=180)
        assert worker.process is not None
        meter = TreeMeter(worker.process.pid).start()
        started = time.time()
        try:
            for index in range(jobs):
                send_bare(sender, "bare_stream_async", f"b{index}", server.base_url)
            sent = time.time()
            wait_until(
                lambda: client.hlen(DONE_KEY) >= jobs,
                timeout=chunks * delay_s * 6 + 120,
                interval=0.5,
                what="every bare stream to end",
            )
        finally:
            meter.stop()
            worker.stop()
        peak_open, received, ended = server.peak_open_streams, server.received, server.ended
    done_at = {
        key.decode() if isinstance(key, bytes) else str(key): float(value)
        for key, value in client.hgetall(DONE_KEY).items()
    }
    done = list(done_at.values())
    client.close()
    sender.close()
    _flush(BENCH_REDIS_URL)
    return RunFigures(
        name="bare Dramatiq, async httpx, no SQL",
        jobs=jobs,
        completed=len(done),
        makespan_s=max(done) - started if done else float("nan"),
        ideal_s=chunks * delay_s,
        cores=meter.cores,
        peak_rss=meter.peak_rss,
        peak_open_streams=peak_open,
        phases=Phases.of(started, sent, received, ended, done_at),
    )


@contextmanager
def database_for(store_name: str, workdir: Path) -> Iterator[str]:
    """A fresh database of ``store_name`` for one run."""
    if store_name == "sqlite":
        yield f"sqlite:///{workdir / f'streams-{uuid.uuid4().hex[:6]}.db'}"
        return
    with fresh_postgres() as url:
        yield url


def print_table(results: list[RunFigures], *, chunks: int, delay_s: float, threads: int) -> None:
    """One column per configuration."""
    jobs = results[0].jobs
    print(
        f"streams: {jobs} jobs of {jobs} users in one worker process (-t {threads}), each {chunks} chunks "
        f"{delay_s:g} s apart; growth sampled every {SAMPLE_INTERVAL_S * 1000:.0f} ms "
        f"(pass: no gap over {delay_s + SAMPLE_INTERVAL_S:g} s, counted in sampling ticks); "
        f"load average before: {os.getloadavg()[0]:.1f}"
    )
    print("| measure | " + " | ".join(r.name for r in results) + " |")
    print("|---" * (len(results) + 1) + "|")

    def row(label: str, cells: list[str]) -> None:
        print(f"| {label} | {' | '.join(cells)} |")

    row(
        "sampled jobs whose content grew every second",
        [f"{r.passed} of {r.sampled}" if r.sampled else "n/a (no store)" for r in results],
    )
    row(
        "longest gap between growths, median / max (s)",
        [
            f"{statistics.median(r.longest_gaps_s):.2f} / {max(r.longest_gaps_s):.2f}" if r.longest_gaps_s else "n/a"
            for r in results
        ],
    )
    row("makespan / ideal", [f"{r.makespan_s / r.ideal_s:.3f} ({r.makespan_s:.1f} s)" for r in results])
    row(
        "where it went (s): last send / last request in / stream at the server p50, max / job done after its stream"
        " p50, max",
        [
            f"{p.sends_done:.1f} / {p.last_request:.1f} / {p.stream_p50:.1f}, {p.stream_max:.1f} / "
            f"{p.end_to_done_p50:.2f}, {p.end_to_done_max:.2f}"
            if (p := r.phases) is not None
            else "n/a"
            for r in results
        ],
    )
    row("CPU (cores)", [f"{r.cores:.2f}" for r in results])
    row("peak RSS of the worker tree (MiB)", [f"{r.peak_rss / MIB:.0f}" for r in results])
    row("streams open at once at the server, peak", [str(r.peak_open_streams) for r in results])
    row("completed", [f"{r.completed} of {r.jobs}" for r in results])


def main(argv: list[str] | None = None) -> int:
    """Run each configuration once and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs (and users) in the batch")
    parser.add_argument("--threads", type=int, default=None, help="worker threads (default: --jobs)")
    parser.add_argument("--samples", type=int, default=50, help="jobs whose growth is sampled")
    parser.add_argument("--chunks", type=int, default=30)
    parser.add_argument("--chunk-delay-s", type=float, default=1.0)
    parser.add_argument("--stores", default="sqlite,postgresql")
    parser.add_argument("--broker", choices=BROKERS, default="redis", help="this project's broker (BROKER_URL)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the bare-Dramatiq run")
    args = parser.parse_args(argv)
    stores = [name.strip() for name in args.stores.split(",") if name.strip()]
    if args.jobs < 1 or set(stores) - {"sqlite", "postgresql"}:
        parser.error("--jobs must be at least 1 and --stores a subset of sqlite,postgresql")
    threads = args.threads or args.jobs
    os.environ["REDIS_URL"] = BENCH_REDIS_URL
    results: list[RunFigures] = []
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        for store_name in stores:
            with database_for(store_name, Path(tmp)) as url, message_broker(args.broker, BENCH_REDIS_URL) as extra:
                results.append(
                    run_project(
                        store_name,
                        url,
                        jobs=args.jobs,
                        threads=threads,
                        samples=min(args.samples, args.jobs),
                        chunks=args.chunks,
                        delay_s=args.chunk_delay_s,
                        workdir=Path(tmp),
                        broker_env=extra,
                    )
                )
        if not args.no_baseline:
            results.append(
                run_bare(
                    jobs=args.jobs, threads=threads, chunks=args.chunks, delay_s=args.chunk_delay_s, workdir=Path(tmp)
                )
            )
    print_table(results, chunks=args.chunks, delay_s=args.chunk_delay_s, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
