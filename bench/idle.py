"""What an idle worker costs, and how fast it picks up a job: this project against bare Dramatiq.

For each thread count (``--threads 8,1000``) a worker process (``--processes 1``) sits idle on a Redis
server of this bench's own (so ``INFO`` counts nobody else's commands) for ``--window-s`` seconds:
measured are the CPU of its process tree (percent of one core) and the Redis commands it sends per
second, and apart the commands its Lua scripts run inside Redis (both counted with ``MONITOR``).
Then pickup: one job every 300 ms, from enqueue to the
provider request reaching the loopback server, p50 and p95, for a job enqueued by another process (this
one) and by the worker process itself (a driver actor, ``BENCH_PICKUP_DRIVER=1``). The baseline is
Dramatiq's stock ``RedisBroker`` and worker settings (``bench.bare_actors``).

    python -m bench.idle [--threads 8,1000] [--window-s 10] [--pickups 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cancel import percentile
from bench.scale_support import TreeMeter, bare_env, project_env
from bench.sse_server import ProcessStreamingServer as StreamingServer

PICKUP_INTERVAL_MS = 300
SETTLE_S = 2.0
MODES = ("project", "bare")


@dataclass
class IdleFigures:
    """One mode at one thread count."""

    mode: str
    threads: int
    cpu_percent: float = 0.0
    commands_per_s: float = 0.0
    lua_calls_per_s: float = 0.0
    pickup_other_ms: list[float] = field(default_factory=list)
    pickup_same_ms: list[float] = field(default_factory=list)
    commands_by_name: dict[str, float] = field(default_factory=dict)


END_MARK = "bench-idle-window-end"


def monitor_commands(redis_url: str, window_s: float) -> tuple[int, int, Counter[str]]:
    """Watch ``MONITOR`` for ``window_s`` seconds: client commands, calls made inside Lua scripts, and
    client commands by name. The window is closed by an ``ECHO`` of this bench's own, which is not counted."""
    import redis

    watcher = redis.Redis.from_url(redis_url)
    closer = redis.Redis.from_url(redis_url)
    client_commands = lua_calls = 0
    by_name: Counter[str] = Counter()
    deadline = time.monotonic() + window_s
    closed = threading.Event()

    def close_window() -> None:
        closed.wait(max(0.0, deadline - time.monotonic()))
        closer.echo(END_MARK)

    timer = threading.Thread(target=close_window, daemon=True)
    with watcher.monitor() as monitor:  # type: ignore[no-untyped-call]
        timer.start()
        while True:
            command = monitor.next_command()
            text = str(command["command"])
            if END_MARK in text:
                break
            if command["client_type"] == "lua":
                lua_calls += 1
            else:
                client_commands += 1
                by_name[text.split(" ", 1)[0].lower()] += 1
    closed.set()
    timer.join()
    watcher.close()
    closer.close()
    return client_commands, lua_calls, by_name


def measure_idle(redis_url: str, session_id: int, window_s: float) -> tuple[float, float, float, dict[str, float]]:
    """CPU percent of a core, client commands/s, Lua-internal calls/s, and client commands/s by name."""
    time.sleep(SETTLE_S)
    meter = TreeMeter(session_id, interval_s=window_s).start()
    commands, lua_calls, by_name = monitor_commands(redis_url, window_s)
    meter.stop()
    rates = {name: count / window_s for name, count in by_name.items()}
    return meter.cores * 100, commands / window_s, lua_calls / window_s, rates


def pickups_from_here(send: Any, server: StreamingServer, prefix: str, count: int) -> list[float]:
    """Send ``count`` jobs from this process ``PICKUP_INTERVAL_MS`` apart; enqueue-to-request latencies in ms."""
    from tests.harness import wait_until

    sent: dict[str, float] = {}
    for index in range(count):
        key = f"{prefix}-{index}"
        sent[key] = time.time()
        send(key, index)
        time.sleep(PICKUP_INTERVAL_MS / 1000)
    wait_until(lambda: all(key in server.received for key in sent), timeout=30, what="every pickup request")
    return [(server.received[key] - sent[key]) * 1000 for key in sent]


def pickups_from_worker(client: Any, sent_key: str, server: StreamingServer, prefix: str, count: int) -> list[float]:
    """Latencies (ms) of the jobs the worker's driver actor sends, read once they all reached the server."""
    from tests.harness import wait_until

    keys = [f"{prefix}-{index}" for index in range(count)]
    timeout = count * PICKUP_INTERVAL_MS / 1000 + 30
    wait_until(lambda: all(key in server.received for key in keys), timeout=timeout, what="every driven pickup")
    sent = {key.decode(): float(value) for key, value in client.hgetall(sent_key).items()}
    return [(server.received[key] - sent[key]) * 1000 for key in keys]


def run_mode(mode: str, threads: int, *, redis_url: str, window_s: float, pickups: int, workdir: Path) -> IdleFigures:
    """Idle cost and pickup of one mode at one thread count."""
    import redis
    from dramatiq.brokers.redis import RedisBroker

    from actors import enqueue_generation
    from actors.queue import JobQueue
    from bench.bare_actors import DRIVER_QUEUE, QUEUE, send_bare
    from bench.bare_actors import SENT_KEY as BARE_SENT_KEY
    from bench.idle_actors import DRIVER, SENT_KEY
    from settings import Settings
    from tests.harness import WorkerProcess

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    figures = IdleFigures(mode, threads)
    run = uuid.uuid4().hex[:6]
    database_url = f"sqlite:///{workdir / f'idle-{run}.db'}"
    with StreamingServer(chunks=1) as server:
        if mode == "project":
            settings = Settings(database_url=database_url, redis_url=redis_url)
            queue = JobQueue(settings)
            queue.bind()
            env = project_env(redis_url, database_url, server.base_url)
            module = "bench.idle_actors"

            def send(key: str, index: int) -> None:
                params = {"model": "bench", "messages": [{"role": "user", "content": f"go [[{key}]]"}]}
                enqueue_generation(user_id=f"{key}-u", params=params, job_id=key)

        else:
            env = bare_env(redis_url)
            module = "bench.bare_actors"
            sender = RedisBroker(url=redis_url, middleware=[])  # type: ignore[no-untyped-call]
            sender.declare_queue(QUEUE)
            sender.declare_queue(DRIVER_QUEUE)

            def send(key: str, index: int) -> None:
                send_bare(sender, "bare_stream_async", key, server.base_url)

        log = workdir / f"worker-{mode}-{threads}.log"
        worker = WorkerProcess(env, log, threads=threads, actors_module=module).start(timeout=180)
        try:
            assert worker.process is not None
            figures.cpu_percent, figures.commands_per_s, figures.lua_calls_per_s, figures.commands_by_name = (
                measure_idle(redis_url, worker.process.pid, window_s)
            )
            figures.pickup_other_ms = pickups_from_here(send, server, f"o{run}", pickups)
        finally:
            worker.stop()
        # The driver's queue is one more consumer polling: it runs only for the same-process pickups.
        worker = WorkerProcess({**env, "BENCH_PICKUP_DRIVER": "1"}, log, threads=threads, actors_module=module).start(
            timeout=180
        )
        try:
            time.sleep(SETTLE_S)
            if mode == "project":
                import actors

                send_bare(actors.broker, "drive_pickup", f"d{run}", pickups, PICKUP_INTERVAL_MS, queue_name=DRIVER)
                figures.pickup_same_ms = pickups_from_worker(client, SENT_KEY, server, f"d{run}", pickups)
            else:
                send_bare(
                    sender,
                    "bare_drive",
                    f"d{run}",
                    pickups,
                    PICKUP_INTERVAL_MS,
                    server.base_url,
                    queue_name=DRIVER_QUEUE,
                )
                figures.pickup_same_ms = pickups_from_worker(client, BARE_SENT_KEY, server, f"d{run}", pickups)
        finally:
            worker.stop()
    if mode == "project":
        queue.store.engine.dispose()
    client.flushdb()
    client.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    """Measure each mode at each thread count on a Redis server of this bench's own; print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--threads", default="8,1000", help="comma-separated worker thread counts")
    parser.add_argument("--window-s", type=float, default=10.0, help="idle measuring window")
    parser.add_argument("--pickups", type=int, default=30, help="jobs per pickup measurement, 300 ms apart")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--show-commands", action="store_true", help="also print the idle commands by name")
    args = parser.parse_args(argv)
    thread_counts = [int(value) for value in args.threads.split(",")]
    modes = [value.strip() for value in args.modes.split(",") if value.strip()]
    if set(modes) - set(MODES) or min(thread_counts) < 1 or args.pickups < 1:
        parser.error("--modes is a subset of project,bare; --threads and --pickups at least 1")
    from tests.faults.own_redis import OwnRedis

    results: list[IdleFigures] = []
    load_before = os.getloadavg()[0]
    with OwnRedis() as own, tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        os.environ["REDIS_URL"] = own.url  # before ``actors`` is imported: its broker talks to this server
        for threads in thread_counts:
            for mode in modes:
                results.append(
                    run_mode(
                        mode,
                        threads,
                        redis_url=own.url,
                        window_s=args.window_s,
                        pickups=args.pickups,
                        workdir=Path(tmp),
                    )
                )
    names = {"project": "this project", "bare": "bare Dramatiq"}
    print(
        f"idle worker (1 process, idle {args.window_s:g} s) and pickup ({args.pickups} jobs, {PICKUP_INTERVAL_MS} ms "
        f"apart, enqueue to provider request); load average before: {load_before:.1f}"
    )
    print("| measure | " + " | ".join(f"{names[r.mode]}, -t {r.threads}" for r in results) + " |")
    print("|---" * (len(results) + 1) + "|")

    def row(label: str, cells: list[str]) -> None:
        print(f"| {label} | {' | '.join(cells)} |")

    row("idle CPU (% of a core)", [f"{r.cpu_percent:.1f}" for r in results])
    row("idle Redis commands/s per process", [f"{r.commands_per_s:.1f}" for r in results])
    row("... plus calls inside Lua scripts/s", [f"{r.lua_calls_per_s:.1f}" for r in results])
    for label, attr in (("another process", "pickup_other_ms"), ("the same process", "pickup_same_ms")):
        row(
            f"pickup p50 / p95 (ms), enqueued by {label}",
            [f"{percentile(getattr(r, attr), 0.5):.1f} / {percentile(getattr(r, attr), 0.95):.1f}" for r in results],
        )
    if args.show_commands:
        for r in results:
            top = sorted(r.commands_by_name.items(), key=lambda item: -item[1])[:8]
            print(f"{names[r.mode]} -t {r.threads}: " + ", ".join(f"{name} {rate:.1f}/s" for name, rate in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
