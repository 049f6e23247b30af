"""The cleanup's selection: only finished jobs older than the retention, in batches."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from repositories.store import JobKind, JobRow, JobStatus, JobStore, utcnow
from tests.conftest import unique


def _job_in(store: JobStore, status: JobStatus, *, age_days: float) -> str:
    job_id = unique(status.value)
    store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    moment = utcnow() - timedelta(days=age_days)
    with store.engine.begin() as connection:
        connection.execute(
            update(JobRow)
            .where(JobRow.job_id == job_id)
            .values(status=str(status), created_at=moment, updated_at=moment)
        )
    return job_id


def test_only_old_finished_jobs_are_deleted(sqlite_store: JobStore) -> None:
    # Given jobs of every status, some older than the retention and some newer
    old = {status: _job_in(sqlite_store, status, age_days=8) for status in JobStatus}
    recent = {status: _job_in(sqlite_store, status, age_days=1) for status in JobStatus}
    # When the cleanup runs with a seven-day retention
    deleted = sqlite_store.delete_finished_before(utcnow() - timedelta(days=7))
    # Then old completed, failed and cancelled jobs are gone, and nothing else is
    assert deleted == 3
    for status, job_id in old.items():
        assert (sqlite_store.get(job_id) is None) is status.is_final
    for job_id in recent.values():
        assert sqlite_store.get(job_id) is not None


def test_old_pending_and_processing_jobs_are_never_deleted(sqlite_store: JobStore) -> None:
    pending = _job_in(sqlite_store, JobStatus.PENDING, age_days=400)
    processing = _job_in(sqlite_store, JobStatus.PROCESSING, age_days=400)
    sqlite_store.delete_finished_before(utcnow())
    assert sqlite_store.get(pending) is not None
    assert sqlite_store.get(processing) is not None


def test_deletion_proceeds_in_batches_until_done(sqlite_store: JobStore) -> None:
    ids = [_job_in(sqlite_store, JobStatus.COMPLETED, age_days=30) for _ in range(7)]
    deleted = sqlite_store.delete_finished_before(utcnow() - timedelta(days=7), batch_size=3)
    assert deleted == 7
    assert all(sqlite_store.get(job_id) is None for job_id in ids)
