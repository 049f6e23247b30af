"""The nightly cleanup, run by a real worker: old finished jobs go, running ones never do."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from actors import cleanup_old_jobs
from repositories.store import JobKind, JobRow, JobStatus, utcnow
from tests.conftest import unique
from tests.integration.conftest import Stack, wait_until


def _aged_job(stack: Stack, status: JobStatus, days: float) -> str:
    job_id = unique(f"aged-{status.value}")
    stack.store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={})
    moment = utcnow() - timedelta(days=days)
    with stack.store.engine.begin() as connection:
        connection.execute(
            update(JobRow)
            .where(JobRow.job_id == job_id)
            .values(status=str(status), created_at=moment, updated_at=moment)
        )
    return job_id


def test_the_cleanup_actor_deletes_only_finished_jobs_past_the_retention(stack: Stack) -> None:
    # Given jobs eight days old in every status, and a finished job from yesterday
    old = {status: _aged_job(stack, status, days=8) for status in JobStatus}
    recent = _aged_job(stack, JobStatus.COMPLETED, days=1)
    # When the cleanup message is sent with nothing, as the scheduler does
    cleanup_old_jobs.send()
    # Then the old completed, failed and cancelled jobs disappear
    wait_until(
        lambda: all(stack.store.get(old[status]) is None for status in JobStatus if status.is_final),
        timeout=20,
        what="old finished jobs to be deleted",
    )
    # And the old pending and processing jobs, and the recent one, stay
    assert stack.store.get(old[JobStatus.PENDING]) is not None
    assert stack.store.get(old[JobStatus.PROCESSING]) is not None
    assert stack.store.get(recent) is not None
    assert "cleanup deleted" in stack.worker.log()
