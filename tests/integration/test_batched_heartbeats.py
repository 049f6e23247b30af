"""``JobStore.heartbeat_many`` on both stores: one call for many leases, texts only where the lease is held."""

from __future__ import annotations

import pytest

from actors.queue import JobQueue
from repositories.store import HEARTBEAT_BATCH, Heartbeat, JobKind, JobStore
from settings import Settings
from tests.conftest import unique

pytestmark = pytest.mark.integration


def _claimed(store: JobStore, count: int) -> list[tuple[str, str]]:
    jobs = [(unique("job"), unique("owner")) for _ in range(count)]
    for job_id, owner in jobs:
        store.create(job_id=job_id, user_id="u1", kind=JobKind.GENERATE, request={}, enqueued=True)
        assert store.claim(job_id, owner=owner, message_id="m", lease_s=30, user_id="u1", kind=JobKind.GENERATE)
    return jobs


def test_more_leases_than_one_statement_holds_are_all_refreshed_and_written(store: JobStore) -> None:
    # Given more running jobs than one statement of heartbeat_many takes, two of them no longer held
    jobs = _claimed(store, HEARTBEAT_BATCH + 3)
    assert store.cancel(jobs[0][0], user_id="u1")
    assert store.cancel(jobs[-1][0], user_id="u1")
    # When every one of them beats, every other one with new text
    texts = [f"text of {job_id}" if index % 2 else None for index, (job_id, _) in enumerate(jobs)]
    lost = store.heartbeat_many(
        [Heartbeat(job_id, owner, text) for (job_id, owner), text in zip(jobs, texts, strict=True)]
    )
    # Then exactly the two cancelled leases are lost, and every held job has its own text, or none
    assert lost == {jobs[0][1], jobs[-1][1]}
    for (job_id, _), text in zip(jobs[1:-1], texts[1:-1], strict=True):
        job = store.get(job_id)
        assert job is not None
        assert job.content == (text or "")
    assert store.get(jobs[0][0]).content == ""  # type: ignore[union-attr]


def test_a_lease_taken_over_by_another_owner_is_lost_to_the_old_one(store: JobStore) -> None:
    # Given a running job whose beat names a stale owner
    ((job_id, owner),) = _claimed(store, 1)
    # When the stale owner and the real one beat in the same call
    lost = store.heartbeat_many([Heartbeat(job_id, "someone-else", "stale"), Heartbeat(job_id, owner, "fresh")])
    # Then only the stale owner lost, and the row holds the real owner's text
    assert lost == {"someone-else"}
    assert store.get(job_id).content == "fresh"  # type: ignore[union-attr]


def test_progress_is_written_while_every_connection_of_the_store_pool_is_taken(postgres_database: str) -> None:
    # Given a worker's runtime on PostgreSQL, one running job, and every connection of the store's pool taken
    # (what 1,000 threads claiming jobs at once do), with a short wait for a pooled connection
    settings = Settings(database_url=postgres_database, database_connect_timeout_s=0.5, cancel_signals=False)
    queue = JobQueue(settings)
    try:
        store, progress = queue.store, queue.runner.progress
        ((job_id, owner),) = _claimed(store, 1)
        running = progress.track(job_id, owner)
        running.append("streamed so far")
        pool = store.engine.pool
        held = [store.engine.connect() for _ in range(pool.size() + pool._max_overflow)]  # type: ignore[attr-defined]
        try:
            # When the progress writer writes its interval
            progress.write([running])
        finally:
            for connection in held:
                connection.close()
        # Then the text is in the row: the writer did not wait for the pool the threads hold
        assert store.get(job_id).content == "streamed so far"  # type: ignore[union-attr]
    finally:
        queue.close()
