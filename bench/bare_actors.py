"""The bare-Dramatiq baseline of the scale benchmarks: the same streaming call, none of this project.

Dramatiq's stock ``RedisBroker`` with its default middleware and worker settings, and actors that
stream one chat completion with httpx (async in ``asyncio.run``, or sync) and write no SQL. Each job
records only its finish time (``HSET bench:bare:done``), so the bench can count and time it.

Run as ``dramatiq bench.bare_actors``; messages are sent with ``send_bare`` from any process. With
``BENCH_PICKUP_DRIVER=1`` a driver actor on its own queue sends jobs from inside the worker (``bench/idle.py``).
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
from typing import Any

import dramatiq
import httpx
import redis
from dramatiq.brokers.redis import RedisBroker

DONE_KEY = "bench:bare:done"
SENT_KEY = "bench:bare:sent"
QUEUE = "bare"
DRIVER_QUEUE = "bare_driver"

#: redis-py caps a pool at 100 connections by default; at ``-t 1000`` the stock broker then fails with
#: "Too many connections" when hundreds of jobs ack at once. Any real deployment at that size raises it too.
_MAX_CONNECTIONS = 10_000
broker = RedisBroker(  # type: ignore[no-untyped-call]
    connection_pool=redis.ConnectionPool.from_url(os.environ["REDIS_URL"], max_connections=_MAX_CONNECTIONS)
)
dramatiq.set_broker(broker)
_client = redis.Redis.from_url(os.environ["REDIS_URL"], max_connections=_MAX_CONNECTIONS)
#: Built once per process, as this project's providers do: loading the CA bundle costs tens of ms of CPU.
_ssl = ssl.create_default_context()


def _body(key: str) -> dict[str, Any]:
    return {"model": "bench", "stream": True, "messages": [{"role": "user", "content": f"go [[{key}]]"}]}


def _text_of(line: str) -> str:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return ""
    chunk = json.loads(line[6:])
    return "".join(choice.get("delta", {}).get("content") or "" for choice in chunk.get("choices") or ())


async def _stream_async(base_url: str, key: str) -> str:
    text: list[str] = []
    async with (
        httpx.AsyncClient(timeout=60, verify=_ssl) as client,
        client.stream("POST", f"{base_url}/chat/completions", json=_body(key)) as response,
    ):
        async for line in response.aiter_lines():
            text.append(_text_of(line))
    return "".join(text)


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def bare_stream_async(job_id: str, base_url: str) -> None:
    """Stream one answer with ``httpx.AsyncClient`` in a fresh event loop (what a naive async actor does)."""
    asyncio.run(_stream_async(base_url, job_id))
    _client.hset(DONE_KEY, job_id, time.time())


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def bare_stream_sync(job_id: str, base_url: str) -> None:
    """Stream one answer with a sync ``httpx.Client``."""
    text: list[str] = []
    with (
        httpx.Client(timeout=60, verify=_ssl) as client,
        client.stream("POST", f"{base_url}/chat/completions", json=_body(job_id)) as response,
    ):
        for line in response.iter_lines():
            text.append(_text_of(line))
    _client.hset(DONE_KEY, job_id, time.time())


if os.environ.get("BENCH_PICKUP_DRIVER") == "1":

    @dramatiq.actor(queue_name=DRIVER_QUEUE, max_retries=0, time_limit=3_600_000)
    def bare_drive(prefix: str, count: int, interval_ms: int, base_url: str) -> None:
        """Send ``count`` async stream jobs from inside the worker, ``interval_ms`` apart, recording each send."""
        for index in range(count):
            job_id = f"{prefix}-{index}"
            _client.hset(SENT_KEY, job_id, time.time())
            bare_stream_async.send(job_id, base_url)
            time.sleep(interval_ms / 1000)


def send_bare(sender: dramatiq.Broker, actor_name: str, *args: Any, queue_name: str = QUEUE) -> None:
    """Enqueue a message for one of these actors through ``sender`` (a broker on the same Redis)."""
    sender.enqueue(dramatiq.Message(queue_name=queue_name, actor_name=actor_name, args=args, kwargs={}, options={}))
