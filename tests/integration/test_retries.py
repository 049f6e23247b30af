"""The contract's retry behaviour against a real worker: what is retried, how often, and how soon."""

from __future__ import annotations

import pytest

from actors import enqueue_generation, enqueue_preview
from repositories.store import JobStatus
from tests.conftest import unique
from tests.integration.conftest import Stack, params
from tests.loopback.openrouter import Reply

LONG_TEXT = "lorem ipsum " * 40


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 529])
def test_a_transient_status_is_retried_and_the_job_completes(stack: Stack, status: int) -> None:
    # Given a provider that fails once with a transient status, then answers
    key = unique("job")
    stack.server.script_for(key, Reply.error(status, message="upstream hiccup"), Reply.ok("recovered"))
    # When a generation runs
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    # Then the second attempt's answer is stored
    assert job.status is JobStatus.COMPLETED, job.error
    assert job.content == "recovered"
    assert job.attempts == 2
    assert len(stack.server.requests_for(key)) == 2


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422])
def test_a_request_error_fails_the_job_at_once(stack: Stack, status: int) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.error(status, message=f"refused with {status}"), Reply.ok("never"))
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert job.status is JobStatus.FAILED
    assert job.attempts == 1
    assert job.error == f"openrouter error {status}: refused with {status}"
    assert len(stack.server.requests_for(key)) == 1


def test_generate_gives_up_after_three_retries_and_stores_the_last_error(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, *[Reply.error(503, message="No provider available")] * 6)
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key), timeout=30)
    assert job.status is JobStatus.FAILED
    assert job.attempts == 4
    assert job.error == "openrouter error 503: No provider available"
    assert len(stack.server.requests_for(key)) == 4


def test_preview_gives_up_after_two_retries(stack: Stack) -> None:
    key = unique("preview")
    stack.server.script_for(key, *[Reply.error(502, message="bad upstream")] * 5)
    job_id = enqueue_preview(user_id="u1", title="t", content=f"{LONG_TEXT} [[{key}]]", job_id=key)
    job = stack.wait_for_status(job_id, timeout=30)
    assert job.status is JobStatus.FAILED
    assert job.attempts == 3
    assert len(stack.server.requests_for(key)) == 3


def test_retry_after_is_honoured_before_the_next_attempt(stack: Stack) -> None:
    # Given a 429 asking for two seconds, while the configured backoff is at most 0.4 s
    key = unique("job")
    stack.server.script_for(key, Reply.error(429, retry_after="2", message="rate limited"), Reply.ok("patient"))
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key), timeout=30)
    # Then the second request came no earlier than two seconds after the first
    assert job.status is JobStatus.COMPLETED
    first, second = stack.server.requests_for(key)
    assert second.received_at - first.received_at >= 2.0


def test_an_error_chunk_mid_stream_is_retried_without_leaking_the_broken_text(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(
        key,
        Reply.ok("BROKEN-", "PARTIAL-", "TEXT", error_after_chunks=2, error_code="server_error"),
        Reply.ok("clean ", "answer"),
    )
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert job.status is JobStatus.COMPLETED
    assert job.content == "clean answer"
    assert job.response is not None
    assert job.response["content"] == "clean answer"
    assert job.attempts == 2


@pytest.mark.parametrize("reset", [False, True])
def test_a_dropped_connection_is_retried(stack: Stack, reset: bool) -> None:
    key = unique("job")
    stack.server.script_for(
        key, Reply.ok("half-", "way", drop_after_chunks=1, drop_with_reset=reset), Reply.ok("whole")
    )
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert job.status is JobStatus.COMPLETED
    assert job.content == "whole"
    assert job.attempts == 2


def test_a_mid_stream_error_naming_a_request_error_is_not_retried(stack: Stack) -> None:
    key = unique("job")
    stack.server.script_for(key, Reply.ok("a", "b", error_after_chunks=1, error_code=403, error_message="flagged"))
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert job.status is JobStatus.FAILED
    assert job.error == "openrouter error 403: flagged"
    assert len(stack.server.requests_for(key)) == 1


def test_an_empty_stream_without_a_finish_reason_is_retried(stack: Stack) -> None:
    # Given a server that ends a stream with [DONE] but no text and no finish reason (an interrupted llama.cpp)
    key = unique("job")
    stack.server.script_for(key, Reply(chunks=(), finish_reason=None), Reply.ok("real answer"))
    job = stack.wait_for_status(enqueue_generation(user_id="u1", params=params(key), job_id=key))
    assert job.status is JobStatus.COMPLETED
    assert job.content == "real answer"
    assert job.attempts == 2
