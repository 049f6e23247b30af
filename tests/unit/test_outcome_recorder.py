"""The outcome recorder: each outcome of an attempt to its store state, observer calls, log line and raise."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from dramatiq.errors import Retry

from actors.jobs import Delivery
from actors.observer import NullObserver
from actors.outcomes import (
    Answer,
    Attempt,
    Cancelled,
    Completed,
    Failed,
    HandedBack,
    OutcomeRecorder,
    RetryLater,
    WaitsForLane,
)
from actors.retry_policy import JobFailed
from admission.lane_gate import LaneWait
from repositories.chat import Finished, Usage
from repositories.errors import Rejected, Unavailable
from repositories.store import Job, JobKind, JobStatus, JobStore
from tests.conftest import unique


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.attempts: list[tuple[str, str, str]] = []
        self.tokens: list[tuple[int, int, float | None]] = []
        self.jobs: list[tuple[str, str, str]] = []

    def attempt_finished(
        self,
        kind: str,
        provider: str,
        outcome: str,
        duration_s: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost: float | None = None,
    ) -> None:
        assert duration_s >= 0
        self.attempts.append((kind, provider, outcome))
        self.tokens.append((prompt_tokens, completion_tokens, cost))

    def job_finished(self, kind: str, provider: str, status: str) -> None:
        self.jobs.append((kind, provider, status))


class Setup:
    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.observer = RecordingObserver()
        self.recorder = OutcomeRecorder(store=store, observer=self.observer, persist=lambda write: write())
        self.requeued: list[str] = []

    def attempt(self, *, provider: str | None = "scripted", started: bool = True) -> Attempt:
        job_id = unique("job")
        self.store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={}, enqueued=True)
        delivery = Delivery(message_id="msg-1", retries=0, requeue=lambda: self.requeued.append("again"))
        job = self.store.claim(job_id, owner=delivery.token, message_id="msg-1", lease_s=30)
        assert job is not None
        attempt = Attempt(job, delivery, answer)
        if provider is not None:
            attempt.using(provider)
        if started:
            attempt.started = time.monotonic()
        return attempt

    def job(self, attempt: Attempt) -> Job:
        job = self.store.get(attempt.job.job_id)
        assert job is not None
        return job


def answer(result: Completed, provider: str) -> Answer:
    return Answer(result.text, {"content": result.text, "provider": provider}, result.finished.model, None)


@pytest.fixture
def setup(sqlite_store: JobStore) -> Setup:
    return Setup(sqlite_store)


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(record.levelno, record.getMessage()) for record in caplog.records if record.name == "actors.jobs"]


FINISHED = Finished(model="m", finish_reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=3), cost=0.25)


def test_completed_stores_the_answer(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    attempt = setup.attempt()
    with caplog.at_level(logging.INFO, logger="actors.jobs"):
        setup.recorder.record(Completed("hello", FINISHED), attempt)
    job = setup.job(attempt)
    assert (job.status, job.content, job.response) == (
        JobStatus.COMPLETED,
        "hello",
        {"content": "hello", "provider": "scripted"},
    )
    assert (job.provider, job.model) == ("scripted", "m")
    assert setup.observer.attempts == [("generate", "scripted", "completed")]
    assert setup.observer.tokens == [(5, 3, 0.25)]
    assert setup.observer.jobs == [("generate", "scripted", "completed")]
    assert [message for _, message in messages(caplog)][-1].startswith("attempt finished in ")
    assert caplog.records[-1].__dict__["job_id"] == attempt.job.job_id


def test_a_completion_that_lost_the_race_to_a_cancel_keeps_the_text(setup: Setup) -> None:
    attempt = setup.attempt()
    assert setup.store.cancel(attempt.job.job_id, user_id="u1")
    setup.recorder.record(Completed("partial answer", FINISHED), attempt)
    job = setup.job(attempt)
    assert (job.status, job.content) == (JobStatus.CANCELLED, "partial answer")
    assert setup.observer.attempts == [("generate", "scripted", "completed")]
    assert setup.observer.jobs == [("generate", "scripted", "cancelled")]


def test_retry_later_releases_the_job_spending_a_retry_and_raises_the_delay(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    attempt = setup.attempt()
    error = Unavailable("down", provider="scripted", status_code=503)
    with caplog.at_level(logging.INFO, logger="actors.jobs"), pytest.raises(Retry) as caught:
        setup.recorder.record(RetryLater(1500, error.describe(), error), attempt)
    assert caught.value.delay == 1500
    assert caught.value.__cause__ is error
    job = setup.job(attempt)
    note = "attempt 1 failed: scripted error 503: down; retrying in 1.5s"
    assert (job.status, job.error, job.retries, job.lease_owner) == (JobStatus.PENDING, note, 1, None)
    assert job.not_before is not None
    assert messages(caplog) == [(logging.WARNING, note)]
    assert setup.observer.attempts == [("generate", "scripted", "retried")]
    assert setup.observer.jobs == []
    assert setup.requeued == []


def test_failed_fails_the_job_and_raises_job_failed(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    attempt = setup.attempt()
    error = Rejected("bad", provider="scripted", status_code=400)
    with caplog.at_level(logging.INFO, logger="actors.jobs"), pytest.raises(JobFailed) as caught:
        setup.recorder.record(Failed(error.describe(), error), attempt)
    assert caught.value.__cause__ is error
    job = setup.job(attempt)
    assert (job.status, job.error) == (JobStatus.FAILED, "scripted error 400: bad")
    assert messages(caplog) == [(logging.WARNING, "job failed: scripted error 400: bad")]
    assert setup.observer.attempts == [("generate", "scripted", "failed")]
    assert setup.observer.jobs == [("generate", "scripted", "failed")]


def test_a_failure_before_any_request_fails_the_job_without_an_attempt(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    attempt = setup.attempt(provider=None, started=False)
    with caplog.at_level(logging.INFO, logger="actors.jobs"), pytest.raises(JobFailed) as caught:
        setup.recorder.record(Failed("provider not configured: no key"), attempt)
    assert caught.value.__suppress_context__
    assert caught.value.__cause__ is None
    assert setup.job(attempt).status is JobStatus.FAILED
    assert messages(caplog) == [(logging.ERROR, "job failed: provider not configured: no key")]
    assert setup.observer.attempts == []
    assert setup.observer.jobs == [("generate", "none", "failed")]


@pytest.mark.parametrize(
    "outcome",
    [
        RetryLater(100, "scripted error 503: down", Unavailable("down", provider="scripted", status_code=503)),
        Failed("scripted error 400: bad", Rejected("bad", provider="scripted", status_code=400)),
    ],
)
def test_a_failure_of_a_job_no_longer_ours_is_dropped(
    setup: Setup, caplog: pytest.LogCaptureFixture, outcome: RetryLater | Failed
) -> None:
    attempt = setup.attempt()
    assert setup.store.cancel(attempt.job.job_id, user_id="u1")
    with caplog.at_level(logging.INFO, logger="actors.jobs"):
        setup.recorder.record(outcome, attempt)  # no raise: the message simply ends
    job = setup.job(attempt)
    assert (job.status, job.retries) == (JobStatus.CANCELLED, 0)
    assert messages(caplog) == [(logging.INFO, "failed attempt dropped: the job was cancelled or taken over")]
    assert setup.observer.attempts == [("generate", "scripted", "dropped")]
    assert setup.observer.jobs == []


def test_cancelled_keeps_the_partial_text(setup: Setup, caplog: pytest.LogCaptureFixture) -> None:
    attempt = setup.attempt()
    assert setup.store.cancel(attempt.job.job_id, user_id="u1")
    with caplog.at_level(logging.INFO, logger="actors.jobs"):
        setup.recorder.record(Cancelled("so fa"), attempt)
    job = setup.job(attempt)
    assert (job.status, job.content) == (JobStatus.CANCELLED, "so fa")
    [(level, message)] = messages(caplog)
    assert level == logging.INFO
    assert message.startswith("attempt stopped: job cancelled after ")
    assert setup.observer.attempts == [("generate", "scripted", "cancelled")]
    assert setup.observer.jobs == [("generate", "scripted", "cancelled")]


def test_handed_back_releases_the_job_and_requeues_without_a_retry(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    attempt = setup.attempt()
    with caplog.at_level(logging.INFO, logger="actors.jobs"):
        setup.recorder.record(HandedBack("abc"), attempt)
    job = setup.job(attempt)
    assert (job.status, job.content, job.retries) == (JobStatus.PENDING, "", 0)
    assert job.error == "attempt 1 stopped: its worker shut down; the job went back to the queue"
    assert setup.requeued == ["again"]
    [(level, message)] = messages(caplog)
    assert level == logging.WARNING
    assert message.endswith(": worker shutting down")
    assert setup.observer.attempts == [("generate", "scripted", "handed_back")]
    assert setup.observer.jobs == []


@pytest.mark.parametrize(("started", "attempts"), [(False, []), (True, [("generate", "scripted", "rate_limited")])])
def test_waits_for_lane_sends_the_job_back_to_its_line_without_a_retry(
    setup: Setup, caplog: pytest.LogCaptureFixture, started: bool, attempts: list[tuple[str, str, str]]
) -> None:
    attempt = setup.attempt(started=started)
    until_ms = int(time.time() * 1000) + 5000
    with caplog.at_level(logging.INFO, logger="actors.jobs"):
        setup.recorder.record(WaitsForLane(LaneWait(note="lane openrouter/m paused", until_ms=until_ms)), attempt)
    job = setup.job(attempt)
    assert (job.status, job.error, job.retries) == (JobStatus.PENDING, "lane openrouter/m paused", 0)
    assert job.not_before is not None
    assert abs(job.not_before.timestamp() * 1000 - until_ms) < 1000
    assert setup.requeued == ["again"]
    assert messages(caplog) == [(logging.WARNING, "lane openrouter/m paused; no retry spent")]
    assert setup.observer.attempts == attempts
    assert setup.observer.jobs == []


def test_an_outcome_for_a_job_taken_over_writes_nothing(setup: Setup) -> None:
    """Fencing: every write carries the delivery's token, so a stale attempt's outcome changes nothing."""
    attempt = setup.attempt()
    stale = Attempt(attempt.job, Delivery(message_id="msg-1", retries=0), answer)
    stale.using("scripted")
    outcomes: list[Callable[[], Any]] = [
        lambda: setup.recorder.record(Completed("x", FINISHED), stale),
        lambda: setup.recorder.record(HandedBack("x"), stale),
        lambda: setup.recorder.record(Cancelled("x"), stale),
    ]
    for record in outcomes:
        record()
    job = setup.job(attempt)
    assert (job.status, job.content, job.lease_owner) == (JobStatus.PROCESSING, "", attempt.delivery.token)
