"""A worker frozen (SIGSTOP) past the broker's heartbeat timeout: its stale copies never stream or write again."""

from __future__ import annotations

import time

from repositories.store import Job, JobStatus
from tests.conftest import unique
from tests.faults.conftest import MakeStack
from tests.faults.harness import LeaseSampler, assert_consistent, max_overlap, stopped, stream_intervals
from tests.harness import wait_until
from tests.loopback.openrouter import Reply

STALE = tuple(f"stale{i} " for i in range(150))  # 0.2 s apart: 30 s, longer than a second worker start and the freeze
FRESH = tuple(f"fresh{i} " for i in range(15))  # 3 s
FRESH_TEXT = "".join(FRESH)
#: A woken attempt stops at its next heartbeat (PROGRESS_INTERVAL_MS=200); the rest is the server noticing.
STOP_WITHIN_S = 1.5


def test_a_frozen_worker_never_streams_beside_the_attempt_that_took_its_jobs_over(fault_stack: MakeStack) -> None:
    # Given worker A streaming two jobs of a user whose limit is two
    stack = fault_stack(GENERATE_USER_CONCURRENCY="2")
    keys = [unique("frozen"), unique("frozen")]
    for key in keys:
        stack.provider.script_for(key, Reply.ok(*STALE, chunk_delay_s=0.2), Reply.ok(*FRESH, chunk_delay_s=0.2))
    worker_a = stack.worker("worker-a", threads=4)
    for key in keys:
        stack.submit(key, "u-frozen")
    for key in keys:
        wait_until(lambda key=key: _streaming(stack.store.get(key)), what=f"{key} streaming")  # type: ignore[misc]
    worker_b = stack.worker("worker-b", threads=4)
    client = stack.redis_server.client()
    with LeaseSampler(client, "generate_llm_response", "u-frozen") as leases:
        # When A is frozen past the broker's heartbeat timeout and the job lease, and B takes both jobs over
        with stopped(worker_a):
            frozen_at = time.time()

            def taken_over() -> bool:
                jobs = [stack.store.get(key) for key in keys]
                return all(job is not None and job.attempts == 2 and job.content.startswith("fresh") for job in jobs)

            try:
                wait_until(taken_over, timeout=40, interval=0.05, what="worker B to take both jobs over")
            except AssertionError:
                states = [(job.status, job.attempts, job.content[:20]) for job in map(stack.store.get, keys) if job]
                raise AssertionError(f"no takeover: {states}\n{worker_b.log()[-6000:]}") from None
        woken_at = time.time()
        # Then, once A wakes up, its stale attempts stop at their next heartbeat without writing anything
        jobs = stack.wait_all_final(keys, timeout=30)
    client.close()
    for job in jobs:
        assert_consistent(job, FRESH_TEXT, provider_calls=2, provider=stack.provider)
        assert "stale" not in job.content
    stale_requests = [request for key in keys for request in stack.provider.requests_for(key)[:1]]
    for request in stale_requests:
        closed = stack.provider.wait_for_close(request, timeout=10)
        assert closed.closed_by_client
        assert closed.closed_at is not None
        assert closed.closed_at - woken_at < STOP_WITHIN_S
    # And the user never had more than its two slots, nor more than two streams that could be read
    assert leases.peak <= 2
    requests = stack.provider.requests
    stale_indexes = {request.index for request in stale_requests}
    readable = [
        (start, min(end, frozen_at)) if request.index in stale_indexes else (start, end)
        for request, (start, end) in zip(requests, stream_intervals(requests), strict=True)
    ]
    assert max_overlap(readable) <= 2
    for key in keys:
        final = stack.store.get(key)
        assert final is not None
        assert final.status is JobStatus.COMPLETED


def _streaming(job: Job | None) -> bool:
    return job is not None and job.content != ""
