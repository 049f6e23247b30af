"""A worker killed with SIGKILL loses no job: its message comes back and another worker completes it."""

from __future__ import annotations

import signal

from actors import enqueue_generation
from repositories.store import JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import Reply


def test_a_job_of_a_killed_worker_is_taken_over_and_completed(stack: Stack) -> None:
    # Given only a doomed worker, streaming a job that stalls half-way
    stack.worker.stop()
    doomed = stack.new_worker(f"doomed-{stack.backend}").start()
    key = unique("job")
    stack.server.script_for(key, Reply.ok("first ", "attempt", stall_after_chunks=1), Reply.ok("second ", "life"))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    wait_until(lambda: (job := stack.store.get(job_id)) and job.content == "first ", timeout=15, what="partial text")
    try:
        # When that worker is killed with SIGKILL and a healthy one starts
        doomed.kill()
    finally:
        stack.worker.start()
    # Then the message comes back after the broker's heartbeat timeout and the job completes
    job = stack.wait_for_status(job_id, timeout=60)
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "second life"
    assert job.attempts == 2
    assert len(stack.server.requests_for(key)) == 2


def test_a_sigterm_hands_a_long_running_job_back_to_the_queue_after_the_grace_period(stack: Stack) -> None:
    # Given a job streaming on a worker whose grace period is 2 s
    stack.worker.stop()
    leaving = stack.new_worker(f"leaving-{stack.backend}").start()
    key = unique("job")
    stack.server.script_for(key, Reply.ok("first ", "attempt", stall_after_chunks=1), Reply.ok("next ", "worker"))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    try:
        wait_until(
            lambda: (job := stack.store.get(job_id)) and job.content == "first ", timeout=15, what="partial text"
        )
        # When the worker is asked to stop
        assert leaving.process is not None
        leaving.process.send_signal(signal.SIGTERM)
        assert leaving.process.wait(timeout=20) == 0
        # Then the stream was closed and the job is pending again, not failed
        assert stack.server.wait_for_close(stack.server.requests_for(key)[0], timeout=5).closed_by_client
        job = stack.store.get(job_id)
        assert job is not None
        assert job.status is JobStatus.PENDING
    finally:
        leaving.kill()
        stack.worker.start()
    # And another worker completes it
    done = stack.wait_for_status(job_id, timeout=30)
    assert done.status is JobStatus.COMPLETED
    assert done.content == "next worker"
