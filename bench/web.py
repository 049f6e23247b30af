"""The web side's event streams: delivery latency against polling ``get_job``, and 500 clients on one process.

A real worker process streams answers from the loopback OpenRouter server (in this process, which
notes when each chunk leaves it), and ``python -m web`` serves the event streams from its own
process. Measured:

- latency from a chunk leaving the provider to its text reaching an SSE client, p50/p95, side by
  side with a client polling ``get_job`` every 500 ms on the same jobs (the workers write progress
  to the store every ``PROGRESS_INTERVAL_MS``, 500 ms by default);
- 500 concurrent SSE clients on one uvicorn process: its peak RSS, its CPU time, and whether every
  client received every character exactly once and the final ``done``.

    python -m bench.web [--jobs 20] [--clients 500]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
POLL_INTERVAL_S = 0.5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class ChunkClock:
    """When each text chunk left the loopback server (it writes chunks from its handler threads)."""

    def __init__(self) -> None:
        self.sent: dict[str, float] = {}
        self._lock = threading.Lock()

    def install(self) -> None:
        """Wrap the server's chunk writer so that every content delta is timed as it is written."""
        from tests.loopback import openrouter

        original = openrouter._Handler._write_data
        clock = self

        def timed(handler: Any, obj: dict[str, Any]) -> None:
            original(handler, obj)
            choices = obj.get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                with clock._lock:
                    clock.sent[content] = time.time()

        openrouter._Handler._write_data = timed  # type: ignore[method-assign,assignment]


class Arrivals:
    """When each chunk's text first reached an observer, from the growing text it saw."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.at: dict[str, float] = {}
        self._next = 0

    def saw(self, text: str, now: float) -> None:
        """The observer holds ``text`` at ``now``: every piece it now contains has arrived."""
        while self._next < len(self.pieces) and self.pieces[self._next] in text:
            self.at.setdefault(self.pieces[self._next], now)
            self._next += 1


def start_web(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    """``python -m web --port 0`` in its own process; returns it and its URL from the ready line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "web", "--host", "127.0.0.1", "--port", "0"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("web: serving at "):
        raise RuntimeError(f"web did not start: {line!r}; see {log}")
    return process, line.split("serving at ", 1)[1].strip()


class ProcessSampler:
    """Peak RSS and CPU time of one process, sampled from /proc every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_rss_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu_s(self) -> float:
        """User plus system CPU seconds used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_kb(self) -> int:
        """Resident set size now, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_rss_kb = max(self.peak_rss_kb, self.rss_kb())

    def __enter__(self) -> ProcessSampler:
        self.peak_rss_kb = self.rss_kb()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def follow(client: Any, url: str, user: str, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Read one job's events to ``done``; return the text shown (resets applied) and the final job."""
    text = ""
    name = "message"
    data: list[str] = []
    async with client.stream("GET", url, headers={"X-User-Id": user}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line == "":
                if data:
                    payload = "\n".join(data)
                    if name == "text":
                        text += payload
                        if on_text is not None:
                            on_text(text)
                    elif name == "reset":
                        text = ""
                    elif name == "done":
                        return {"text": text, "done": json.loads(payload)}
                name, data = "message", []
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
    return {"text": text, "done": None}


def submit(base_url: str, user: str, job_id: str, pieces: list[str]) -> None:
    """POST the job through the web API; its prompt routes the loopback server to ``job_id``'s reply."""
    import httpx

    body = {
        "job_id": job_id,
        "params": {"model": "bench/model", "messages": [{"role": "user", "content": f"go [[{job_id}]]"}]},
    }
    response = httpx.post(base_url + "jobs", json=body, headers={"X-User-Id": user}, timeout=30)
    response.raise_for_status()


def measure_latency(base_url: str, server: Any, clock: ChunkClock, *, jobs: int, chunks: int) -> dict[str, list[float]]:
    """Stream ``jobs`` answers at once; each is followed by an SSE client and by a poller of ``get_job``."""
    import httpx

    from actors import get_job
    from tests.loopback.openrouter import Reply

    plans = []
    for j in range(jobs):
        job_id = f"lat-{uuid.uuid4().hex[:12]}"
        pieces = [f"J{j}C{i:03d}{uuid.uuid4().hex[:6]}; " for i in range(chunks)]
        server.script_for(job_id, Reply.ok(*pieces, chunk_delay_s=0.1, first_chunk_delay_s=1.0))
        plans.append((job_id, f"lat-user-{j}", pieces))

    sse = {job_id: Arrivals(pieces) for job_id, _, pieces in plans}
    polled = {job_id: Arrivals(pieces) for job_id, _, pieces in plans}
    stop = threading.Event()

    def poll(job_id: str) -> None:
        while not stop.is_set():
            job = get_job(job_id)
            if job is not None:
                polled[job_id].saw(job.content, time.time())
                if job.status.is_final:
                    return
            time.sleep(POLL_INTERVAL_S)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

            async def one(job_id: str, user: str) -> None:
                await follow(client, f"jobs/{job_id}/events", user, lambda text: sse[job_id].saw(text, time.time()))

            followers = []
            for job_id, user, pieces in plans:
                await asyncio.to_thread(submit, base_url, user, job_id, pieces)
                followers.append(asyncio.create_task(one(job_id, user)))
            await asyncio.gather(*followers)

    pollers = [threading.Thread(target=poll, args=(job_id,), daemon=True) for job_id, _, _ in plans]
    for thread in pollers:
        thread.start()
    asyncio.run(run())
    for thread in pollers:
        thread.join(timeout=10)
    stop.set()

    def latencies(arrivals: dict[str, Arrivals]) -> list[float]:
        return [
            (arrived - clock.sent[piece]) * 1000
            for observed in arrivals.values()
            for piece, arrived in observed.at.items()
            if piece in clock.sent
        ]

    written = written_at(server, [job_id for job_id, _, _ in plans])
    to_redis = [(written[piece] - clock.sent[piece]) * 1000 for piece in written if piece in clock.sent]
    from_redis = [
        (arrived - written[piece]) * 1000
        for observed in sse.values()
        for piece, arrived in observed.at.items()
        if piece in written
    ]
    return {"sse": latencies(sse), "poll": latencies(polled), "to_redis": to_redis, "from_redis": from_redis}


def written_at(server: Any, job_ids: list[str]) -> dict[str, float]:
    """When each piece was appended to its job's Redis Stream: the entry id is Redis's clock in ms."""
    import actors
    from repositories.live_text import LiveEntry, stream_key

    written: dict[str, float] = {}
    for job_id in job_ids:
        items: list[tuple[bytes, dict[Any, Any]]] = actors.broker.client.xrange(stream_key(job_id))  # type: ignore[assignment]
        for entry_id, fields in items:
            entry = LiveEntry.parse(fields)
            if entry is None or entry.kind != "text":
                continue
            at = int(entry_id.decode().split("-")[0]) / 1000
            for piece in entry.text.split("; "):
                if piece:
                    written.setdefault(piece + "; ", at)
    return written


def measure_fan_out(
    base_url: str, server: Any, web_pid: int, *, clients: int, jobs: int, chunks: int
) -> dict[str, Any]:
    """``clients`` SSE clients over ``jobs`` streaming jobs, all on the one web process."""
    import httpx

    from tests.loopback.openrouter import Reply

    plans = []
    for j in range(jobs):
        job_id = f"fan-{uuid.uuid4().hex[:12]}"
        pieces = [f"[{j}:{i}]" + "x" * 40 for i in range(chunks)]
        server.script_for(job_id, Reply.ok(*pieces, chunk_delay_s=0.02, first_chunk_delay_s=1.0))
        plans.append((job_id, f"fan-user-{j}", "".join(pieces)))

    async def run() -> list[tuple[str, dict[str, Any]]]:
        limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
            for job_id, user, _ in plans:
                await asyncio.to_thread(submit, base_url, user, job_id, [])
            tasks = []
            for index in range(clients):
                job_id, user, _ = plans[index % jobs]
                tasks.append((job_id, asyncio.create_task(follow(client, f"jobs/{job_id}/events", user))))
            return [(job_id, await task) for job_id, task in tasks]

    with ProcessSampler(web_pid) as sampler:
        cpu_before = sampler.cpu_s()
        started = time.monotonic()
        results = asyncio.run(run())
        wall_s = time.monotonic() - started
        cpu_s = sampler.cpu_s() - cpu_before
    expected = {job_id: text for job_id, _, text in plans}
    complete = sum(
        1
        for job_id, result in results
        if result["text"] == expected[job_id] and result["done"] and result["done"]["status"] == "completed"
    )
    return {
        "clients": clients,
        "jobs": jobs,
        "chars_per_job": len(plans[0][2]),
        "complete": complete,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "peak_rss_mb": sampler.peak_rss_kb / 1024,
    }


@contextlib.contextmanager
def fresh_postgres(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database for this run, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"bench_web_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=20, help="concurrent jobs of the latency run")
    parser.add_argument("--chunks", type=int, default=40, help="chunks per job of the latency run, 100 ms apart")
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--fan-out-jobs", type=int, default=25)
    parser.add_argument(
        "--postgres",
        metavar="ADMIN_URL",
        help="store the jobs in a fresh PostgreSQL database made through this admin URL (default: SQLite)",
    )
    args = parser.parse_args(argv)
    os.environ["REDIS_URL"] = BENCH_REDIS_URL

    import actors
    from actors.queue import JobQueue
    from settings import Settings
    from tests.harness import WorkerProcess
    from tests.loopback.openrouter import OpenRouterServer

    clock = ChunkClock()
    clock.install()
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-web-"))
        server = stack.enter_context(OpenRouterServer())
        workdir = Path(tmp)
        database_url = f"sqlite:///{workdir / 'web.db'}"
        if args.postgres:
            database_url = stack.enter_context(fresh_postgres(args.postgres))
        settings = Settings(database_url=database_url, redis_url=BENCH_REDIS_URL)
        queue = JobQueue(settings)
        queue.bind()
        actors.broker.flush_all()
        env = {
            **os.environ,
            "REDIS_URL": BENCH_REDIS_URL,
            "DATABASE_URL": database_url,
            "OPENROUTER_BASE_URL": server.base_url,
            "OPENROUTER_API_KEY": "bench",
            "GENERATE_USER_CONCURRENCY": "50",
            "WEB_DEV_IDENTITY": "true",
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
        threads = max(args.jobs, args.fan_out_jobs)
        worker = WorkerProcess(env, workdir / "worker.log", threads=threads).start()
        web, base_url = start_web(env, workdir / "web.log")
        try:
            latency = measure_latency(base_url, server, clock, jobs=args.jobs, chunks=args.chunks)
            fan_out = measure_fan_out(
                base_url, server, web.pid, clients=args.clients, jobs=args.fan_out_jobs, chunks=150
            )
        finally:
            web.terminate()
            web.wait(timeout=10)
            worker.stop()
        actors.broker.flush_all()

    print(
        f"delivery latency, chunk leaving the loopback provider -> text at the client; {args.jobs} jobs streaming "
        f"at once, {args.chunks} chunks 100 ms apart each; {'PostgreSQL' if args.postgres else 'SQLite'} store, "
        "PROGRESS_INTERVAL_MS=500 (default)"
    )
    print("| client | chunks | p50 ms | p95 ms | p99 ms | max ms | mean ms |")
    print("|---|---|---|---|---|---|---|")
    for name, values in (
        ("SSE /jobs/{id}/events (Redis Stream)", latency["sse"]),
        ("polling get_job every 500 ms (baseline)", latency["poll"]),
        ("  of SSE: provider -> Redis Stream (worker)", latency["to_redis"]),
        ("  of SSE: Redis Stream -> SSE client (web)", latency["from_redis"]),
    ):
        print(
            f"| {name} | {len(values)} | {percentile(values, 0.5):.1f} | {percentile(values, 0.95):.1f} "
            f"| {percentile(values, 0.99):.1f} | {max(values):.1f} | {statistics.mean(values):.1f} |"
        )
    print()
    print(
        f"{fan_out['clients']} concurrent SSE clients on one uvicorn process (python -m web), over "
        f"{fan_out['jobs']} jobs streaming at once ({fan_out['chars_per_job']} characters each, 150 chunks)"
    )
    print("| clients | received everything once + done | wall s | web CPU s | web peak RSS MB |")
    print("|---|---|---|---|---|")
    print(
        f"| {fan_out['clients']} | {fan_out['complete']} / {fan_out['clients']} | {fan_out['wall_s']:.1f} "
        f"| {fan_out['cpu_s']:.2f} | {fan_out['peak_rss_mb']:.0f} |"
    )
    expected_chunks = args.jobs * args.chunks
    ok = fan_out["complete"] == fan_out["clients"] and len(latency["sse"]) == expected_chunks
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
