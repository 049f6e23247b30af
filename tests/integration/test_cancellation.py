"""Cancelling: a pending job is never sent, a processing job stops and keeps its partial text."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from actors import cancel_job, cancel_llm_job, enqueue_generation, generate_llm_response
from repositories.store import JobKind, JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params, wait_until
from tests.loopback.openrouter import Reply

SLOW_PIECES = [f"piece{i} " for i in range(100)]


def _start_slow_job(stack: Stack, user_id: str = "u1") -> str:
    key = unique("job")
    stack.server.script_for(key, Reply.ok(*SLOW_PIECES, chunk_delay_s=0.1), Reply.ok("a later attempt"))
    job_id = enqueue_generation(user_id=user_id, params=params(key), job_id=key)
    wait_until(lambda: (job := stack.store.get(job_id)) and job.content, timeout=10, what="partial text")
    return job_id


def test_a_pending_job_is_cancelled_and_never_sent_to_the_provider(stack: Stack) -> None:
    # Given a pending job whose message is delayed
    key = unique("job")
    stack.store.create(job_id=key, user_id="u1", kind=JobKind.GENERATE, request=params(key))
    generate_llm_response.send_with_options(kwargs={"job_id": key, "user_id": "u1", "params": params(key)}, delay=500)
    # When it is cancelled
    assert cancel_job(key, user_id="u1") is True
    # Then once its message was handled, the provider never saw it
    stack.wait_until_no_message_for(key)
    job = stack.store.get(key)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert stack.server.requests_for(key) == []


def test_a_processing_job_stops_streaming_and_keeps_its_partial_text(stack: Stack) -> None:
    # Given a job streaming slowly
    job_id = _start_slow_job(stack)
    # When it is cancelled
    assert cancel_job(job_id, user_id="u1") is True
    # Then the provider connection is closed by the worker within a second
    request = stack.server.requests_for(job_id)[0]
    closed = stack.server.wait_for_close(request, timeout=5)
    assert closed.closed_by_client
    assert closed.closed_at is not None
    # And the job is cancelled with a proper prefix of the answer kept
    job = stack.wait_for_status(job_id)
    assert job.status is JobStatus.CANCELLED
    full = "".join(SLOW_PIECES)
    assert job.content
    assert full.startswith(job.content)
    assert len(job.content) < len(full)
    # And it is never retried
    stack.wait_until_no_message_for(job_id)
    assert len(stack.server.requests_for(job_id)) == 1


def test_cancel_during_a_retry_backoff_prevents_the_next_attempt(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.error(503, retry_after="2"), Reply.ok("should not run"))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    # Given a job waiting for its retry after a 503 that asked for two seconds
    wait_until(lambda: (job := stack.store.get(job_id)) and job.attempts == 1 and job.status is JobStatus.PENDING)
    # When it is cancelled / Then the retry never reaches the provider
    assert cancel_job(job_id, user_id="u1") is True
    stack.wait_until_no_message_for(job_id)
    assert len(stack.server.requests_for(key)) == 1
    job = stack.store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED


def test_a_finished_job_is_left_alone(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("done"))
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert cancel_job(job.job_id, user_id="u1") is False
    after = stack.store.get(job.job_id)
    assert after is not None
    assert after.status is JobStatus.COMPLETED
    assert after.content == "done"


def test_unknown_jobs_and_other_users_jobs_are_not_cancelled(stack: Stack) -> None:
    job_id = _start_slow_job(stack, user_id="owner")
    assert cancel_job(unique("nope"), user_id="owner") is False
    assert cancel_job(job_id, user_id="intruder") is False
    job = stack.store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.PROCESSING
    assert cancel_job(job_id, user_id="owner") is True


def test_the_cancel_actor_has_the_same_effect(stack: Stack) -> None:
    job_id = _start_slow_job(stack)
    cancel_llm_job.send(job_id=job_id, user_id="u1")
    job = stack.wait_for_status(job_id)
    assert job.status is JobStatus.CANCELLED
    request = stack.server.requests_for(job_id)[0]
    assert stack.server.wait_for_close(request, timeout=5).closed_by_client


def test_the_provider_connection_closes_within_a_second_of_cancel_returning(stack: Stack) -> None:
    job_id = _start_slow_job(stack)
    assert cancel_job(job_id, user_id="u1") is True
    returned_at = time.time()
    request = stack.server.wait_for_close(stack.server.requests_for(job_id)[0], timeout=5)
    assert request.closed_by_client
    assert request.closed_at is not None
    assert request.closed_at - returned_at < 1.0


def test_two_cancels_at_once_succeed_exactly_once(stack: Stack) -> None:
    job_id = _start_slow_job(stack)
    barrier = threading.Barrier(2)

    def cancel_now() -> bool:
        barrier.wait()
        return cancel_job(job_id, user_id="u1")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: cancel_now(), range(2)))
    assert sorted(results) == [False, True]
    assert stack.wait_for_status(job_id).status is JobStatus.CANCELLED


@pytest.mark.parametrize("offset_s", [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])
def test_a_cancel_racing_claim_or_completion_ends_in_one_final_status(stack: Stack, offset_s: float) -> None:
    # Given a short job, cancelled at some moment between its enqueue and its completion
    key = unique("race")
    stack.server.script_for(key, Reply.ok("a", "b", "c", chunk_delay_s=0.05))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    time.sleep(offset_s)  # the race itself: the cancel lands at a chosen instant
    cancelled = cancel_job(job_id, user_id="u1")
    # Then the job ends in exactly the status the cancel reported, and stays there
    job = stack.wait_for_status(job_id)
    stack.wait_until_no_message_for(job_id)
    later = stack.store.get(job_id)
    assert later is not None
    assert later.status is job.status
    assert (job.status is JobStatus.CANCELLED) is cancelled
    assert job.status in {JobStatus.CANCELLED, JobStatus.COMPLETED}
    if job.status is JobStatus.COMPLETED:
        assert job.content == "abc"
    assert len(stack.server.requests_for(key)) <= 1


def test_cancel_of_a_job_whose_worker_was_just_killed_is_final(stack: Stack) -> None:
    # Given a job streaming on a worker that is then killed
    stack.worker.stop()
    doomed = stack.new_worker(f"doomed-cancel-{stack.backend}").start()
    key = unique("job")
    stack.server.script_for(key, Reply.ok("first", "x", stall_after_chunks=1), Reply.ok("must not run"))
    job_id = enqueue_generation(user_id="u1", params=params(key), job_id=key)
    try:
        wait_until(lambda: (job := stack.store.get(job_id)) and job.content == "first", timeout=15)
        doomed.kill()
        # When it is cancelled while nobody runs it
        assert cancel_job(job_id, user_id="u1") is True
    finally:
        stack.worker.start()
    # Then the redelivered message does not revive it and no second attempt reaches the provider
    stack.wait_until_no_message_for(job_id, timeout=60)
    job = stack.store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert job.content == "first"
    assert len(stack.server.requests_for(key)) == 1


def test_without_the_pubsub_signal_the_heartbeat_still_stops_the_stream(stack: Stack) -> None:
    stack.worker.stop()
    deaf = stack.new_worker(f"deaf-{stack.backend}", CANCEL_SIGNALS="false").start()
    try:
        job_id = _start_slow_job(stack)
        assert cancel_job(job_id, user_id="u1") is True
        request = stack.server.wait_for_close(stack.server.requests_for(job_id)[0], timeout=5)
        assert request.closed_by_client
        assert stack.wait_for_status(job_id).status is JobStatus.CANCELLED
    finally:
        deaf.stop()
        stack.worker.start()
