"""The status transition table and the compare-and-set writes that enforce it."""

from __future__ import annotations

import pytest

from repositories.store import FINAL_STATUSES, TRANSITIONS, JobKind, JobStatus, JobStore, sources_of
from tests.conftest import unique


def test_final_statuses_have_no_way_out() -> None:
    # Given the transition table / Then completed, failed and cancelled lead nowhere
    assert set(FINAL_STATUSES) == {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    for status in FINAL_STATUSES:
        assert TRANSITIONS[status] == frozenset()


def test_a_retry_is_the_only_way_back_to_pending() -> None:
    assert sources_of(JobStatus.PENDING) == (JobStatus.PROCESSING,)


def test_completion_is_reached_only_from_processing() -> None:
    assert sources_of(JobStatus.COMPLETED) == (JobStatus.PROCESSING,)


def test_cancel_is_reached_from_pending_and_processing() -> None:
    assert set(sources_of(JobStatus.CANCELLED)) == {JobStatus.PENDING, JobStatus.PROCESSING}


def _processing_job(store: JobStore, owner: str = "m1") -> str:
    job_id = unique("job")
    store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    assert store.claim(job_id, owner=owner, lease_s=30) is not None
    return job_id


def test_a_cancelled_job_cannot_be_completed(sqlite_store: JobStore) -> None:
    # Given a processing job that is cancelled
    job_id = _processing_job(sqlite_store)
    assert sqlite_store.cancel(job_id, user_id="u1")
    # When the worker tries to store its answer
    completed = sqlite_store.complete(
        job_id, owner="m1", content="late", response={}, provider="p", model="m", usage=None
    )
    # Then the write is refused and the job stays cancelled
    assert not completed
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.CANCELLED


def test_a_completed_job_cannot_be_cancelled_failed_or_retried(sqlite_store: JobStore) -> None:
    job_id = _processing_job(sqlite_store)
    assert sqlite_store.complete(job_id, owner="m1", content="x", response={}, provider="p", model="m", usage=None)

    assert not sqlite_store.cancel(job_id, user_id="u1")
    assert not sqlite_store.fail(job_id, error="boom")
    assert not sqlite_store.release_for_retry(job_id, owner="m1", error="boom")
    assert sqlite_store.claim(job_id, owner="m1", lease_s=30) is None
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.COMPLETED
    assert job.error is None


def test_another_users_cancel_changes_nothing(sqlite_store: JobStore) -> None:
    job_id = _processing_job(sqlite_store)
    assert not sqlite_store.cancel(job_id, user_id="intruder")
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.PROCESSING


def test_a_processing_job_with_a_live_lease_is_not_claimed_by_another_message(sqlite_store: JobStore) -> None:
    job_id = _processing_job(sqlite_store, owner="m1")
    assert sqlite_store.claim(job_id, owner="m2", lease_s=30) is None


def test_a_redelivered_copy_of_the_same_message_cannot_take_a_live_lease(sqlite_store: JobStore) -> None:
    # Given a job processing under attempt token t1 of message m1 (its worker froze past the broker's timeout)
    job_id = unique("job")
    sqlite_store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    assert sqlite_store.claim(job_id, owner="t1", message_id="m1", lease_s=30) is not None
    # When m1 is redelivered, with a fresh token t2, while the lease is live
    # Then it does not take the job over, and t1 still owns the row
    assert sqlite_store.claim(job_id, owner="t2", message_id="m1", lease_s=30) is None
    assert sqlite_store.heartbeat(job_id, owner="t1")


def test_a_stale_lease_is_taken_over_with_a_fresh_token_and_fences_the_old_one(sqlite_store: JobStore) -> None:
    # Given a job processing under token t1 whose heartbeat is stale
    job_id = unique("job")
    sqlite_store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    assert sqlite_store.claim(job_id, owner="t1", message_id="m1", lease_s=30) is not None
    # When a redelivered copy of the same message claims it with token t2
    job = sqlite_store.claim(job_id, owner="t2", message_id="m1", lease_s=0)
    # Then t2 owns it, a second attempt is counted, and t1 can write nothing any more
    assert job is not None
    assert (job.lease_owner, job.lease_message, job.attempts) == ("t2", "m1", 2)
    assert not sqlite_store.heartbeat(job_id, owner="t1", content="stale")
    assert not sqlite_store.complete(
        job_id, owner="t1", content="x", response={}, provider=None, model=None, usage=None
    )
    assert not sqlite_store.release_for_retry(job_id, owner="t1", error="late")


def test_a_stale_lease_is_taken_over_by_any_message(sqlite_store: JobStore) -> None:
    job_id = _processing_job(sqlite_store, owner="m1")
    job = sqlite_store.claim(job_id, owner="m2", lease_s=0)
    assert job is not None
    assert job.lease_owner == "m2"
    # and the old owner can no longer write progress
    assert not sqlite_store.heartbeat(job_id, owner="m1", content="stale")


def test_a_retry_drops_the_failed_attempts_text(sqlite_store: JobStore) -> None:
    job_id = _processing_job(sqlite_store)
    assert sqlite_store.heartbeat(job_id, owner="m1", content="half an ans")
    assert sqlite_store.release_for_retry(job_id, owner="m1", error="503")
    job = sqlite_store.get(job_id)
    assert job is not None
    assert job.status is JobStatus.PENDING
    assert job.content == ""


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED])
def test_status_enum_reports_finality(status: JobStatus) -> None:
    assert status.is_final
