"""The job runner against the in-memory scripted provider and SQLite: outcomes, retries, stops."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from dramatiq.errors import Retry

from actors.jobs import Delivery, JobFailed, JobRunner, RetryPolicy
from actors.payloads import GenerateMessage, PreviewMessage
from repositories.chat import ChatProvider
from repositories.errors import RateLimited, Rejected, Unavailable
from repositories.scripted import ScriptedProvider, ScriptedReply
from repositories.store import JobKind, JobStatus, JobStore
from tests.conftest import unique


def runner_for(store: JobStore, provider: ChatProvider, **options: Any) -> JobRunner:
    return JobRunner(
        store=store,
        provider_factory=lambda: provider,
        preview_model="preview-model",
        retry_policy=RetryPolicy(min_backoff_ms=100, max_backoff_ms=400),
        progress_interval_s=0.05,
        **options,
    )


def generate(job_id: str) -> GenerateMessage:
    return GenerateMessage.model_validate(
        {"job_id": job_id, "user_id": "u1", "params": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    )


def delivery(retries: int = 0, requeued: list[str] | None = None) -> Delivery:
    return Delivery(
        message_id="msg-1",
        retries=retries,
        requeue=(lambda: requeued.append("again")) if requeued is not None else None,
    )


def test_a_completed_generation_stores_text_usage_and_provider(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider([ScriptedReply(pieces=("a", "b"))])
    job_id = unique("job")
    runner_for(sqlite_store, provider).run_generation(generate(job_id), delivery())
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    assert job.content == "ab"
    assert job.response is not None
    assert job.response["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert job.response["provider"] == "scripted"


def test_a_transient_error_becomes_a_retry_no_earlier_than_retry_after(sqlite_store: JobStore) -> None:
    error = RateLimited("slow down", provider="scripted", status_code=429, retry_after_s=2)
    provider = ScriptedProvider([ScriptedReply(pieces=("x",), error=error, error_after=1)])
    job_id = unique("job")
    with pytest.raises(Retry) as caught:
        runner_for(sqlite_store, provider).run_generation(generate(job_id), delivery())
    assert caught.value.delay is not None
    assert caught.value.delay > 2000
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.PENDING
    assert job.content == ""
    assert job.error is not None
    assert "429" in job.error


def test_the_last_allowed_attempt_fails_the_job(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider([ScriptedReply(error=Unavailable("down", provider="scripted", status_code=503))])
    job_id = unique("job")
    with pytest.raises(JobFailed):
        runner_for(sqlite_store, provider).run_generation(generate(job_id), delivery(retries=3))
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.FAILED
    assert job.error == "scripted error 503: down"


def test_a_rejected_request_fails_at_once(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider([ScriptedReply(error=Rejected("bad", provider="scripted", status_code=400))])
    job_id = unique("job")
    with pytest.raises(JobFailed):
        runner_for(sqlite_store, provider).run_generation(generate(job_id), delivery())
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.FAILED


def test_a_provider_that_cannot_be_built_fails_the_job_naming_the_reason(sqlite_store: JobStore) -> None:
    def missing_key() -> ChatProvider:
        raise ValueError("OPENROUTER_API_KEY is required")

    runner = JobRunner(
        store=sqlite_store,
        provider_factory=missing_key,
        preview_model="p",
        retry_policy=RetryPolicy(100, 400),
    )
    job_id = unique("job")
    with pytest.raises(JobFailed):
        runner.run_generation(generate(job_id), delivery())
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.error == "provider not configured: OPENROUTER_API_KEY is required"


def test_a_hand_back_stops_the_stream_and_requeues_the_job(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider([ScriptedReply(pieces=tuple("abcdefghij"), delay_s=0.2)])
    runner = runner_for(sqlite_store, provider)
    job_id = unique("job")
    requeued: list[str] = []
    thread = threading.Thread(target=runner.run_generation, args=(generate(job_id), delivery(requeued=requeued)))
    thread.start()
    while runner.hand_back_running() == 0 and thread.is_alive():
        thread.join(0.01)
    thread.join(10)
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.PENDING
    assert requeued == ["again"]
    assert provider.closed_early == 1


def test_short_preview_content_is_kept_without_a_model_call(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider()
    job_id = unique("preview")
    message = PreviewMessage(job_id=job_id, user_id="u1", title="t", content="short")
    runner_for(sqlite_store, provider).run_preview(message, delivery())
    assert provider.requests == []
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.response == {"preview": "short", "used_ai": False}


def test_a_delivery_without_its_own_cap_gets_the_policy_cap_of_its_kind(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider([ScriptedReply(error=Unavailable("down", provider="scripted", status_code=503))])
    runner = runner_for(sqlite_store, provider)
    # Generate: 3 retries, so the third delivery (2 retries so far) still gets a retry.
    with pytest.raises(Retry):
        runner.run_generation(generate(unique("job")), Delivery(message_id="m", retries=2))
    # Preview: 2 retries, so the same delivery fails the job.
    preview_id = unique("preview")
    message = PreviewMessage(job_id=preview_id, user_id="u1", title="t", content="long " * 100)
    with pytest.raises(JobFailed):
        runner.run_preview(message, Delivery(message_id="m", retries=2))
    job = sqlite_store.get(preview_id)
    assert job is not None
    assert (job.status, job.error) == (JobStatus.FAILED, "scripted error 503: down")


def test_a_preview_is_summarised_and_its_answer_stored(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider([ScriptedReply(pieces=("A  short\n", "summary"))])
    job_id = unique("preview")
    message = PreviewMessage(job_id=job_id, user_id="u1", title="t", content="long " * 100)
    runner_for(sqlite_store, provider).run_preview(message, delivery())
    job = sqlite_store.get(job_id)
    assert job is not None
    assert (job.status, job.content) == (JobStatus.COMPLETED, "A short summary")
    assert job.response is not None
    assert job.response["preview"] == "A short summary"
    assert job.response["used_ai"] is True
    assert provider.requests[0].model == "preview-model"


def test_a_cancel_while_streaming_keeps_the_partial_text_and_is_not_retried(sqlite_store: JobStore) -> None:
    provider = ScriptedProvider([ScriptedReply(pieces=tuple("abcdefghij"), delay_s=0.1)])
    runner = runner_for(sqlite_store, provider)
    job_id = unique("job")
    thread = threading.Thread(target=runner.run_generation, args=(generate(job_id), delivery()))
    thread.start()
    while thread.is_alive():
        job = sqlite_store.get(job_id)
        if job is not None and job.content:
            assert sqlite_store.cancel(job_id, user_id="u1")
            break
        thread.join(0.02)
    thread.join(10)
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED
    assert job.content
    assert "abcdefghij".startswith(job.content)
    assert provider.closed_early == 1


class _CommittedLate(JobStore):
    """A store whose job row commits just after the delivery's first claim looked for it (the enqueue commits its
    row only once the message is sent, and a pushed message can arrive before that)."""

    row: tuple[str, str] | None = None

    def claim(self, job_id: str, **kwargs: Any) -> Any:
        if self.row is not None:
            self.create(job_id=self.row[0], user_id=self.row[1], kind=JobKind.GENERATE, request={}, enqueued=True)
            self.row = None
            return None  # the claim ran before the commit
        return super().claim(job_id, **kwargs)


def test_a_row_committed_just_after_the_first_claim_is_claimed_and_run(sqlite_store: JobStore) -> None:
    # Given a delivery that finds no row to claim, because its enqueue commits it a moment later
    store = _CommittedLate(sqlite_store.engine)
    job_id = unique("job")
    store.row = (job_id, "u1")
    provider = ScriptedProvider([ScriptedReply(pieces=("late", " row"))])
    # When the delivery runs
    runner_for(store, provider).run_generation(generate(job_id), delivery())
    # Then it claimed the row once it was there and ran the job, instead of skipping a pending job
    job = store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    assert job.content == "late row"
