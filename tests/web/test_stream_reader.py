"""One blocking XREAD serves the reads of many streams, against real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid

import redis.asyncio as aioredis

from tests.conftest import TEST_REDIS_URL
from web.feed import StreamReader


def test_a_read_of_a_new_stream_is_answered_while_another_read_blocks() -> None:
    async def scenario() -> tuple[float, int]:
        blocking = aioredis.Redis.from_url(TEST_REDIS_URL, single_connection_client=True)
        control = aioredis.Redis.from_url(TEST_REDIS_URL)
        reader = StreamReader(blocking, control)
        quiet, busy = f"quiet-{uuid.uuid4().hex}", f"busy-{uuid.uuid4().hex}"
        try:
            # Given a read that blocks for 5 s on a stream that stays empty
            waiting = asyncio.create_task(reader.read(quiet, "0", 5.0))
            await asyncio.sleep(0.2)
            # When another stream is read and gets an entry
            started = time.monotonic()
            second = asyncio.create_task(reader.read(busy, "0", 5.0))
            await asyncio.sleep(0.05)
            await control.xadd(busy, {"k": "reset", "a": 1})
            items = await asyncio.wait_for(second, timeout=2)
            elapsed = time.monotonic() - started
            waiting.cancel()
            return elapsed, len(items)
        finally:
            await reader.close()
            await control.delete(busy)
            await blocking.aclose()
            await control.aclose()

    elapsed, count = asyncio.run(scenario())
    # Then the second read is answered at once, not when the first one's block ends
    assert count == 1
    assert elapsed < 1.5
