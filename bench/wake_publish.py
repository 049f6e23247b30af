"""What the wake-up ``PUBLISH`` adds to one ``enqueue_generation``: calls alternating with and without it.

In one process, on a fresh database of each store, ``--calls`` calls of ``enqueue_generation`` (after
``--warmup`` more) alternate between the broker publishing its wake-up and not; no worker runs.

    python -m bench.wake_publish [--calls 1000] [--warmup 200] [--stores sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench.cancel import percentile
from bench.scale_support import BENCH_REDIS_URL
from bench.throughput import _flush, database_for


def measure(database_url: str, *, calls: int, warmup: int) -> dict[bool, list[float]]:
    """Milliseconds per call, by whether the wake-up was published."""
    from actors import enqueue_generation
    from actors.queue import JobQueue
    from settings import Settings

    _flush(BENCH_REDIS_URL)
    queue = JobQueue(Settings(database_url=database_url, redis_url=BENCH_REDIS_URL))
    previous = queue.bind()
    broker = queue.broker
    timings: dict[bool, list[float]] = {True: [], False: []}
    try:
        for index in range(warmup + calls):
            publish = index % 2 == 0
            broker.wake_idle_consumers = publish
            key = uuid.uuid4().hex
            params = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}
            started = time.perf_counter()
            enqueue_generation(user_id=f"u-{key}", params=params, job_id=key)
            if index >= warmup:
                timings[publish].append((time.perf_counter() - started) * 1000)
    finally:
        if previous is not None:
            previous.bind()
        queue.close()
        _flush(BENCH_REDIS_URL)
    return timings


def main(argv: list[str] | None = None) -> int:
    """Print one Markdown table: p50 and p95 per store, with and without the publish."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--stores", default="sqlite,postgresql")
    args = parser.parse_args(argv)
    print(f"enqueue_generation, ms (p50 / p95), {args.calls} calls alternating, no worker running")
    print("| store | with the wake-up publish | without it |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-wake-publish-") as tmp:
        for store_name in [name.strip() for name in args.stores.split(",") if name.strip()]:
            with database_for(store_name, Path(tmp)) as url:
                timings = measure(url, calls=args.calls, warmup=args.warmup)
            cells = [f"{percentile(timings[m], 0.5):.2f} / {percentile(timings[m], 0.95):.2f}" for m in (True, False)]
            print(f"| {store_name} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
