"""Redis restarts, with and without persistence: every job still completes, and the user limit holds."""

from __future__ import annotations

from repositories.store import JobStatus
from tests.conftest import unique
from tests.faults.conftest import MakeStack
from tests.faults.harness import FaultStack, assert_consistent, max_overlap, stream_intervals
from tests.harness import wait_until
from tests.loopback.openrouter import Reply

LONG = tuple(f"w{i} " for i in range(24))  # 24 chunks, 0.25 s apart: a 6 s stream
LONG_TEXT = "".join(LONG)


def _wait_pending_for_retry(stack: FaultStack, job_id: str) -> None:
    wait_until(
        lambda: (job := stack.store.get(job_id)) is not None and job.status is JobStatus.PENDING and job.retries == 1,
        timeout=20,
        what=f"{job_id} to wait for its retry",
    )


def _wait_delayed_in_redis(stack: FaultStack, count: int) -> None:
    """Wait until ``count`` delayed messages are stored in Redis: a retry's row is released before Dramatiq's
    Retries middleware enqueues its delayed message, and a restart in between would test a send to a Redis
    that is down, not a delay queue surviving a restart."""
    client = stack.redis_server.client()
    try:
        wait_until(
            lambda: sum(int(client.hlen(key)) for key in client.scan_iter("dramatiq:*.DQ.msgs")) == count,
            timeout=20,
            what=f"{count} delayed messages in Redis",
        )
    finally:
        client.close()


def _wait_streaming(stack: FaultStack, job_id: str) -> None:
    wait_until(
        lambda: (job := stack.store.get(job_id)) is not None and job.content != "",
        timeout=20,
        what=f"{job_id} to stream",
    )


def test_retries_waiting_in_a_workers_delay_queue_survive_a_redis_restart_with_aof(fault_stack: MakeStack) -> None:
    # Given three jobs that failed once and wait in the worker's delay queue for their retry (Retry-After 4 s)
    stack = fault_stack(appendonly=True)
    keys = [unique("aof") for _ in range(3)]
    for key in keys:
        stack.provider.script_for(key, Reply.error(503, retry_after=4), Reply.ok("second ", "try"))
    stack.worker("worker")
    for key in keys:
        stack.submit(key, "u-aof")
    for key in keys:
        _wait_pending_for_retry(stack, key)
    _wait_delayed_in_redis(stack, len(keys))
    # When Redis restarts (AOF on: it loses nothing), with no reconciler running
    stack.redis_server.restart(down_s=1.0)
    # Then the same worker process runs every retry, and each job completes with its second call
    for job in stack.wait_all_final(keys, timeout=30):
        assert_consistent(job, "second try", provider_calls=2, provider=stack.provider)


def test_a_redis_restart_without_persistence_loses_no_job(fault_stack: MakeStack) -> None:
    # Given, on a worker with two threads and a limit of one job per user: a job waiting for its retry, two
    # jobs streaming, one parked behind its user's limit and two left in the queue
    stack = fault_stack(GENERATE_USER_CONCURRENCY="1")
    retrying, streaming, parked, second_stream = (unique(name) for name in ("retry", "stream", "parked", "stream"))
    queued = [unique("queued"), unique("queued")]
    stack.provider.script_for(retrying, Reply.error(503, retry_after=8), Reply.ok("after ", "retry"))
    for key in (streaming, second_stream):
        stack.provider.script_for(key, Reply.ok(*LONG, chunk_delay_s=0.25))
    for key in (parked, *queued):
        stack.provider.script_for(key, Reply.ok("short ", "one"))
    stack.worker("worker", threads=2)
    stack.scheduler()
    stack.submit(retrying, "u-retry")
    _wait_pending_for_retry(stack, retrying)
    stack.submit(streaming, "u-limited")
    _wait_streaming(stack, streaming)
    stack.submit(parked, "u-limited")
    client = stack.redis_server.client()
    wait_until(lambda: client.llen("llm-throttle:parked:generate_llm_response:u-limited") == 1, what="parked job")
    stack.submit(second_stream, "u-other")
    _wait_streaming(stack, second_stream)
    for index, key in enumerate(queued):
        stack.submit(key, f"u-queued-{index}")
    assert client.llen("dramatiq:llm_generate") >= 1
    client.close()
    # When Redis restarts empty
    stack.redis_server.restart(down_s=1.0)
    # Then every job completes: the streams went on, the retry ran from the worker's memory, and the reconciler
    # re-sent the parked and queued jobs whose messages were lost, without spending a retry
    every = [retrying, streaming, parked, second_stream, *queued]
    jobs = {job.job_id: job for job in stack.wait_all_final(every, timeout=60)}
    assert_consistent(jobs[retrying], "after retry", provider_calls=2, provider=stack.provider)
    for key in (streaming, second_stream):
        assert_consistent(jobs[key], LONG_TEXT, provider_calls=1, provider=stack.provider)
    for key in (parked, *queued):
        assert_consistent(jobs[key], "short one", provider_calls=1, provider=stack.provider)
        assert jobs[key].retries == 0


def test_a_redis_restart_without_persistence_keeps_a_user_at_its_limit(fault_stack: MakeStack) -> None:
    # Given a user at its limit of two running jobs, with two more parked
    stack = fault_stack(GENERATE_USER_CONCURRENCY="2")
    running = [unique("run"), unique("run")]
    parked = [unique("parked"), unique("parked")]
    later = [unique("later"), unique("later")]
    for key in (*running, *parked, *later):
        stack.provider.script_for(key, Reply.ok(*LONG, chunk_delay_s=0.25))
    stack.worker("worker", threads=8)
    stack.scheduler()
    for key in running:
        stack.submit(key, "u-busy")
    for key in running:
        _wait_streaming(stack, key)
    for key in parked:
        stack.submit(key, "u-busy")
    client = stack.redis_server.client()
    wait_until(lambda: client.llen("llm-throttle:parked:generate_llm_response:u-busy") == 2, what="parked jobs")
    client.close()
    # When Redis restarts empty, forgetting the user's two slots and its parked jobs
    stack.redis_server.restart(down_s=1.0)
    # Then the worker puts the slots of its running jobs back at once
    client = stack.redis_server.client()
    leases = "llm-throttle:leases:generate_llm_response:u-busy"
    wait_until(lambda: client.zcard(leases) == 2, timeout=5, what="the running jobs' slots to be recreated")
    client.close()
    # And jobs sent now, and the lost parked ones the reconciler re-sends, wait for those slots
    for key in later:
        stack.submit(key, "u-busy")
    jobs = stack.wait_all_final([*running, *parked, *later], timeout=60)
    for job in jobs:
        assert_consistent(job, LONG_TEXT, provider_calls=1, provider=stack.provider)
    assert max_overlap(stream_intervals(stack.provider.requests)) == 2
