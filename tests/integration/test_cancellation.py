"""Cancelling: a pending job is never sent, a processing job stops and keeps its partial text."""

from __future__ import annotations

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
