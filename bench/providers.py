"""Per-job overhead of each provider, side by side, through a real worker process and the same loopback servers.

For each ``LLM_PROVIDER`` a real worker streams a fixed loopback reply (20 chunks, no delay by default), so the
providers are compared rather than the server. Measured: time to first text as seen in the store (enqueue to
the first non-empty ``content``) and wall time (enqueue to ``completed``) over sequential jobs, the first
(cold) job apart, and the RSS summed over the worker's process tree (from ``/proc``): idle at boot, at peak while
4 jobs run at once, and idle again once they are done.

With an instant reply the text usually reaches the store with the completion (progress is written every
``PROGRESS_INTERVAL_MS``), so first text and wall time are close; ``--chunk-delay-ms`` spreads the stream out.

    python -m bench.providers [--jobs 20] [--concurrent 4] [--providers openrouter,anthropic,claude-agent-sdk]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cancel import BENCH_REDIS_URL, percentile

PROVIDERS = ("openrouter", "anthropic", "claude-agent-sdk")
CLAUDE_MODEL = "claude-haiku-4-5"
#: How often the store is polled for a job's first text and completion, in seconds.
POLL_INTERVAL_S = 0.002
#: How often the worker tree's RSS is sampled while the concurrent jobs run, in seconds.
RSS_SAMPLE_INTERVAL_S = 0.01
#: Batches of concurrent jobs run for the peak RSS (a short batch may fall between two samples).
CONCURRENT_ROUNDS = 3


@dataclass
class ProviderFigures:
    """What one provider measured: per-job latencies in milliseconds and RSS in bytes."""

    provider: str
    first_job_ms: float
    first_text_ms: list[float]
    wall_ms: list[float]
    idle_rss: int
    peak_rss: int
    settled_rss: int


def tree_rss_bytes(session_id: int) -> int:
    """The resident set size summed over every process of the session a worker leads (its whole tree)."""
    return tree_usage(session_id)[0]


def tree_usage(session_id: int) -> tuple[int, int]:
    """RSS in bytes summed over the processes of the session a worker leads, and how many processes it has."""
    total = processes = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # The command name in ``stat`` is parenthesised and may hold spaces: split after its closing paren.
            if int(stat.rsplit(")", 1)[1].split()[3]) != session_id:
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        processes += 1
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total, processes


@contextmanager
def peak_rss_sampler(session_id: int) -> Iterator[Callable[[], int]]:
    """Sample the tree's RSS every ``RSS_SAMPLE_INTERVAL_S`` in a thread; yields a getter of the peak in bytes."""
    peak = tree_rss_bytes(session_id)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(RSS_SAMPLE_INTERVAL_S):
            peak = max(peak, tree_rss_bytes(session_id))

    thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        stop.set()
        thread.join()


def time_job(job_id: str, started: float, *, timeout_s: float = 60.0) -> tuple[float, float]:
    """Poll the store until the job completes; return (first text, completion) in ms after ``started``."""
    from actors import JobStatus, get_job

    first_text: float | None = None
    while True:
        job = get_job(job_id)
        now = time.perf_counter()
        if job is not None:
            if first_text is None and job.content:
                first_text = now
            if job.status is JobStatus.COMPLETED:
                return ((first_text or now) - started) * 1000, (now - started) * 1000
            if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise RuntimeError(f"bench job {job_id} ended {job.status}: {job.error}")
        if now - started > timeout_s:
            raise TimeoutError(f"bench job {job_id} did not complete in {timeout_s:.0f}s")
        time.sleep(POLL_INTERVAL_S)


def run_provider(
    provider: str, *, jobs: int, concurrent: int, chunk_delay_s: float, progress_interval_ms: int, workdir: Path
) -> ProviderFigures:
    """Start a worker for ``provider`` against the loopback servers and measure its jobs and memory."""
    import actors
    from actors import enqueue_generation
    from actors.queue import JobQueue
    from settings import Settings
    from tests.harness import PROJECT_ROOT, WorkerProcess, wait_until
    from tests.loopback import anthropic as anthropic_loopback
    from tests.loopback import openrouter as openrouter_loopback

    database_url = f"sqlite:///{workdir / f'{provider}.db'}"
    settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL)
    queue = JobQueue(settings)
    queue.bind()
    actors.broker.flush_all()
    chunks = [f"w{i} " for i in range(20)]
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENROUTER_", "ANTHROPIC_", "CLAUDE_"))
    }
    env = {
        **inherited,
        "REDIS_URL": BENCH_REDIS_URL,
        "DATABASE_URL": database_url,
        "LLM_PROVIDER": provider,
        "PROGRESS_INTERVAL_MS": str(progress_interval_ms),
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    with (
        openrouter_loopback.OpenRouterServer() as openrouter,
        anthropic_loopback.AnthropicServer() as anthropic,
    ):
        openrouter.default = openrouter_loopback.Reply.ok(*chunks, chunk_delay_s=chunk_delay_s)
        anthropic.default = anthropic_loopback.Reply.ok(*chunks, chunk_delay_s=chunk_delay_s)
        if provider == "openrouter":
            model = "bench/model"
            env.update(OPENROUTER_BASE_URL=openrouter.base_url, OPENROUTER_API_KEY="bench")
        else:
            model = CLAUDE_MODEL
            env.update(ANTHROPIC_BASE_URL=anthropic.base_url, ANTHROPIC_API_KEY="bench", PREVIEW_MODEL=CLAUDE_MODEL)
        params: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say hello"}]}
        worker = WorkerProcess(env, workdir / f"worker-{provider}.log", threads=max(8, concurrent)).start()
        assert worker.process is not None
        session = worker.process.pid
        try:
            idle_rss, idle_processes = tree_usage(session)

            def enqueue_and_time() -> tuple[float, float]:
                started = time.perf_counter()
                return time_job(enqueue_generation(user_id="bench", params=params), started)

            _, first_job_ms = enqueue_and_time()
            timings = [enqueue_and_time() for _ in range(jobs)]
            with peak_rss_sampler(session) as peak_rss:
                for _ in range(CONCURRENT_ROUNDS):
                    batch = [
                        (time.perf_counter(), enqueue_generation(user_id="bench", params=params))
                        for _ in range(concurrent)
                    ]
                    for started, job_id in batch:
                        time_job(job_id, started)
            peak = peak_rss()
            # Measured once every process a job started (a Claude Code CLI) is gone again.
            settled_rss = wait_until(
                lambda: (usage := tree_usage(session))[1] <= idle_processes and usage[0],
                timeout=10,
                what="the worker tree to be back to its idle processes",
            )
        finally:
            worker.stop()
    actors.broker.flush_all()
    return ProviderFigures(
        provider=provider,
        first_job_ms=first_job_ms,
        first_text_ms=[first for first, _ in timings],
        wall_ms=[wall for _, wall in timings],
        idle_rss=idle_rss,
        peak_rss=peak,
        settled_rss=settled_rss,
    )


def table_row(figures: ProviderFigures) -> str:
    """One Markdown row: first-text and wall percentiles in ms, the cold first job, and the RSS figures in MiB."""
    mib = 1024 * 1024
    first, wall = figures.first_text_ms, figures.wall_ms
    return (
        f"| {figures.provider} | {len(wall)} | {percentile(first, 0.5):.0f} | {percentile(first, 0.95):.0f} "
        f"| {percentile(wall, 0.5):.0f} | {percentile(wall, 0.95):.0f} | {statistics.mean(wall):.0f} "
        f"| {figures.first_job_ms:.0f} | {figures.idle_rss / mib:.0f} | {figures.peak_rss / mib:.0f} "
        f"| {figures.settled_rss / mib:.0f} |"
    )


def main(argv: list[str] | None = None) -> int:
    """Measure every requested provider one after the other and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20, help="sequential jobs per provider (after one cold job)")
    parser.add_argument("--concurrent", type=int, default=4, help="jobs running at once for the peak RSS")
    parser.add_argument("--chunk-delay-ms", type=int, default=0, help="delay between the 20 loopback chunks")
    parser.add_argument("--progress-interval-ms", type=int, default=200, help="the worker's PROGRESS_INTERVAL_MS")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated LLM_PROVIDER values")
    args = parser.parse_args(argv)
    providers = [name.strip() for name in args.providers.split(",") if name.strip()]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown or args.jobs < 1 or args.concurrent < 1:
        parser.error(f"unknown providers {unknown}" if unknown else "--jobs and --concurrent must be at least 1")
    os.environ["REDIS_URL"] = BENCH_REDIS_URL
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-providers-") as tmp:
        for provider in providers:
            results.append(
                run_provider(
                    provider,
                    jobs=args.jobs,
                    concurrent=args.concurrent,
                    chunk_delay_s=args.chunk_delay_ms / 1000,
                    progress_interval_ms=args.progress_interval_ms,
                    workdir=Path(tmp),
                )
            )
    print(
        f"per-job overhead by provider: {args.jobs} sequential jobs each after one cold job, loopback reply of "
        f"20 chunks {args.chunk_delay_ms} ms apart, PROGRESS_INTERVAL_MS={args.progress_interval_ms}, SQLite store; "
        f"RSS summed over the worker's process tree, peak while {args.concurrent} jobs run at once"
    )
    print(
        "| provider | jobs | first text p50 ms | first text p95 ms | wall p50 ms | wall p95 ms | wall mean ms "
        "| cold first job ms | RSS idle at boot MiB | RSS peak MiB | RSS idle after jobs MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for figures in results:
        print(table_row(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
