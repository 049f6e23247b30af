"""PostgreSQL refusing connections for 60 s while jobs stream: the streams are kept, every job completes once."""

from __future__ import annotations

import time

from tests.conftest import unique
from tests.faults.conftest import MakeStack
from tests.faults.harness import FaultStack, assert_consistent
from tests.faults.proxy import TcpProxy
from tests.harness import wait_until
from tests.loopback.openrouter import Reply

OUTAGE_S = 60.0
CHUNKS = tuple(f"t{i} " for i in range(16))  # 16 chunks, 0.25 s apart: a 4 s stream, over before the store is back
TEXT = "".join(CHUNKS)


def test_a_60_s_store_outage_keeps_the_running_streams_and_completes_every_job_once(
    fault_stack: MakeStack, pg_proxy: TcpProxy
) -> None:
    # Given six jobs streaming, their progress written through the proxy in front of PostgreSQL
    stack = fault_stack()
    streaming = [unique("outage") for _ in range(6)]
    waiting = [unique("waiting") for _ in range(2)]
    for key in (*streaming, *waiting):
        stack.provider.script_for(key, Reply.ok(*CHUNKS, chunk_delay_s=0.25))
    stack.worker("worker", threads=8)
    stack.scheduler()
    for index, key in enumerate(streaming):
        stack.submit(key, f"u-outage-{index % 3}")
    for key in streaming:
        wait_until(lambda key=key: _has_text(stack, key), timeout=20, what=f"{key} to stream")  # type: ignore[misc]
    # When PostgreSQL refuses every connection for 60 s, and two more jobs are sent meanwhile
    pg_proxy.set_mode("refuse")
    outage_started = time.monotonic()
    for index, key in enumerate(waiting):
        stack.submit(key, f"u-waiting-{index}")
    for key in streaming:
        stack.provider.wait_for_close(stack.provider.wait_for_requests(1, key=key)[0], timeout=20)
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_started)))  # the fault lasts this long, by design
    pg_proxy.set_mode("pass")
    # Then every job completes: the running streams were kept (one provider call each), the jobs sent during
    # the outage waited without spending a retry, and nothing was dead-lettered
    for job in stack.wait_all_final([*streaming, *waiting], timeout=60):
        assert_consistent(job, TEXT, provider_calls=1, provider=stack.provider)
        assert job.attempts == 1
        assert job.retries == 0
    client = stack.redis_server.client()
    assert client.hlen("dramatiq:llm_generate.XQ.msgs") == 0
    client.close()


def _has_text(stack: FaultStack, key: str) -> bool:
    job = stack.store.get(key)
    return job is not None and job.content != ""
